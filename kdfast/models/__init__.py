"""Teacher/student masked LMs with tapped passes (q/k/v, hidden states, pre-decoder states).

``load_teacher`` / ``build_student`` give HF masked-LM models; ``DistillPair`` runs both on a
batch with a ``Plan`` and returns ``Taps``. See kdfast/models/forward.py for why the pass is our
own layer loop over the HF modules.
"""
from kdfast.models.attention import attend, flash_attn_available
from kdfast.models.checks import check_batch, check_same_inputs, check_tokenizer, check_vocab
from kdfast.models.forward import base_model, mlm_head, tapped_forward
from kdfast.models.loading import PRESETS, build_student, copy_teacher_layers, freeze, load_teacher
from kdfast.models.pair import DistillPair, run_model
from kdfast.models.plan import ModelPlan, Plan
from kdfast.models.taps import ModelTaps, Taps

__all__ = [
    "load_teacher", "build_student", "copy_teacher_layers", "freeze", "PRESETS", "DistillPair", "run_model",
    "Plan", "ModelPlan", "Taps", "ModelTaps", "tapped_forward", "base_model", "mlm_head", "attend",
    "flash_attn_available", "check_vocab", "check_tokenizer", "check_batch", "check_same_inputs",
]
