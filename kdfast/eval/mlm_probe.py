"""The MLM-head probe: one intrinsic measure comparable across every arm, including those that never
train their MLM head (TinyBERT, MiniLM).

A fresh linear head [H -> V] is fitted on the frozen encoder's standardised last-layer states at
masked positions of training sequences: its bias starts at the log unigram prior of the training
labels and its weights at zero, so it starts at the unigram baseline; Adam then runs until the loss
on a held-out tenth of the positions stops improving (the best state is kept, at most ``steps``
steps). A fixed budget from a random head measured how fast the unigram is learnt, not the encoder:
the pretrained teacher scored worse than a random-init student. Its cross-entropy is taken at masked
positions of held-out sequences. At the tiny preset's scale the teacher's own MLM head is only about
0.1 nat better than the unigram prior on held-out WikiText, so expect little power there. Masking:
``MASK_FRACTION`` of the non-special positions of each sequence, chosen by a seeded generator (the
same positions for every model), all replaced by [MASK]. Lower is better. The per-position losses
are the ``Scores`` (metric ``mean``), so arms are compared on the same held-out positions.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from kdfast.eval import features
from kdfast.eval.stats import Scores

MASK_FRACTION = 0.15
CHECK_EVERY, PATIENCE = 25, 3   # steps between dev checks; checks without improvement before stopping


def masked(sequences: torch.Tensor, mask_id: int, special: Sequence[int], seed: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked ids [N, L], positions [P, 2], original ids [P]) with a seeded choice of positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = sequences.long().clone()
    eligible = ~torch.isin(ids, torch.tensor(list(special)))
    chosen = (torch.rand(ids.shape, generator=generator) < MASK_FRACTION) & eligible
    positions = chosen.nonzero()
    labels = ids[chosen]
    ids[chosen] = mask_id
    return ids, positions, labels


def describe(steps: int, batch: int) -> str:
    return (f"MLM-head probe: fresh linear head on standardised frozen last-layer states (bias started at the "
            f"log unigram prior, weights at zero), Adam on batches of {batch} masked positions until the loss on "
            f"a dev tenth stops improving (at most {steps} steps, best kept), held-out cross-entropy (nats) per "
            f"masked position; lower is better")


def fit_head(x: torch.Tensor, labels: torch.Tensor, vocab: int, steps: int, batch: int, lr: float,
             generator: torch.Generator, check_every: int = CHECK_EVERY, patience: int = PATIENCE
             ) -> torch.nn.Linear:
    """A linear head [H -> vocab] fitted on features ``x`` [P, H] (standardised) and ``labels`` [P]: Adam
    from the unigram prior, stopped early on a held-out tenth of the positions (the best state kept)."""
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    cut = max(1, x.shape[0] // 10)
    x_dev, y_dev, x_fit, y_fit = x[order[:cut]], labels[order[:cut]], x[order[cut:]], labels[order[cut:]]
    head = torch.nn.Linear(x.shape[1], vocab).to(x.device)
    with torch.no_grad():
        counts = torch.bincount(y_fit, minlength=vocab).double() + 1.0
        head.weight.zero_()
        head.bias.copy_((counts / counts.sum()).log().float())
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    best, best_state, since = math.inf, None, 0
    for step in range(steps + 1):
        if step % check_every == 0 or step == steps:
            with torch.no_grad():
                dev_loss = torch.nn.functional.cross_entropy(head(x_dev), y_dev).item()
            if dev_loss < best:
                best, best_state, since = dev_loss, {k: v.clone() for k, v in head.state_dict().items()}, 0
            else:
                since += 1
            if since >= patience or step == steps:
                break
        pick = torch.randint(0, x_fit.shape[0], (batch,), generator=generator).to(x.device)
        loss = torch.nn.functional.cross_entropy(head(x_fit[pick]), y_fit[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.load_state_dict(best_state)
    return head


def evaluate(model_path: str, train: torch.Tensor, heldout: torch.Tensor, mask_id: int, special: Sequence[int],
             device: torch.device, steps: int = 2000, batch: int = 512, lr: float = 3e-3, seed: int = 0) -> Scores:
    """Per-position held-out losses [1, P] of the head fitted on ``train`` [N, L] sequences."""
    model, tokenizer = features.load_encoder(model_path, device)
    train_ids, train_pos, train_labels = masked(train, mask_id, special, seed)
    test_ids, test_pos, test_labels = masked(heldout, mask_id, special, seed + 1)
    x_train = features.token_features(model, train_ids, train_pos, device).to(device)
    x_test = features.token_features(model, test_ids, test_pos, device).to(device)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardised like the sentence probes
    head = fit_head((x_train - mean) / std, train_labels.to(device), len(tokenizer), steps, batch, lr,
                    torch.Generator().manual_seed(seed))
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(head((x_test - mean) / std), test_labels.to(device),
                                                   reduction="none")
    return Scores(losses.cpu().numpy()[None, :], None, "mean")
