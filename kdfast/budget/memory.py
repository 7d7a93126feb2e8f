"""Will the teacher and one training step fit on the device? A coarse estimate, checked up front."""
from __future__ import annotations

import torch

from kdfast.budget.device import available_bytes
from kdfast.budget.flops import EncoderShape

GIB = 2 ** 30
ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two Adam moments


def activation_bytes(model: EncoderShape, batch: int, seq: int, bytes_per_value: int) -> float:
    """Activations one training forward keeps per layer: 34·B·L·H + 5·B·h·L^2 values at 2 bytes
    (Korthikanti et al., 2022), scaled to ``bytes_per_value``."""
    per_layer = batch * seq * (34 * model.hidden + 5 * model.heads * seq) / 2
    return model.layers * per_layer * bytes_per_value


def step_bytes(teacher: EncoderShape, student: EncoderShape, batch: int, seq: int,
               teacher_bytes_per_param: int, activation_bytes_per_value: int) -> dict:
    """Bytes for the teacher's weights (plus its kept taps) and one student training step."""
    teacher_weights = teacher.params * teacher_bytes_per_param
    teacher_taps = 3 * teacher.layers * batch * seq * teacher.hidden * teacher_bytes_per_param
    student_state = student.params * ADAM_BYTES_PER_PARAM
    student_activations = activation_bytes(student, batch, seq, activation_bytes_per_value)
    total = teacher_weights + teacher_taps + student_state + student_activations
    return {"teacher_weights": teacher_weights, "teacher_taps": teacher_taps, "student_state": student_state,
            "student_activations": student_activations, "total": total}


def check_fits(teacher: EncoderShape, student: EncoderShape, batch: int, seq: int, device: torch.device,
               teacher_bytes_per_param: int, strategies: int = 1) -> dict:
    """The estimate of :func:`step_bytes` (students x ``strategies``); ValueError naming the memory
    needed when the device has less free."""
    activation_bytes_per_value = 2 if device.type == "cuda" else 4
    need = step_bytes(teacher, student, batch, seq, teacher_bytes_per_param, activation_bytes_per_value)
    total = need["teacher_weights"] + need["teacher_taps"] + need["student_activations"] \
        + strategies * need["student_state"]
    free = available_bytes(device)
    if total > free:
        raise ValueError(
            f"teacher: expected a teacher and training step that fit on {device} ({free / GIB:.2f} GiB free), got "
            f"about {total / GIB:.2f} GiB needed: teacher {teacher.params / 1e6:.0f}M params = "
            f"{need['teacher_weights'] / GIB:.2f} GiB, {strategies} student(s) with Adam state "
            f"{strategies * need['student_state'] / GIB:.2f} GiB, activations at batch {batch} x seq {seq} "
            f"{need['student_activations'] / GIB:.2f} GiB; lower --batch or --seq, or use a bigger device")
    return {**need, "total": total, "free": free}
