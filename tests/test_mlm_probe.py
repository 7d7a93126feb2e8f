"""The MLM-head probe's fitted head: it starts at the unigram prior, so features without information
cannot score worse than the prior, and features that carry the label score far better."""
import math

import torch

from kdfast.eval import mlm_probe


def _data(informative: bool, n: int = 6000, vocab: int = 50, width: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prior = torch.distributions.Categorical(probs=torch.arange(1, vocab + 1, dtype=torch.float) ** -1.1)
    torch.manual_seed(seed)
    labels = prior.sample((n,))
    x = torch.randn(n, width, generator=generator)
    if informative:  # the label's own random code, plus noise
        x += 2.0 * torch.randn(vocab, width, generator=generator)[labels]
    return x, labels, prior


def _heldout_loss(informative: bool) -> tuple:
    x, labels, prior = _data(informative)
    head = mlm_probe.fit_head(x[:5000], labels[:5000], 50, steps=1000, batch=256, lr=3e-3,
                              generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(head(x[5000:]), labels[5000:]).item()
    return loss, prior.entropy().item()


def test_a_head_on_uninformative_features_stays_at_the_unigram_baseline():
    loss, entropy = _heldout_loss(informative=False)
    assert abs(loss - entropy) < 0.1, (loss, entropy)


def test_a_head_on_informative_features_beats_the_unigram_baseline_by_far():
    loss, entropy = _heldout_loss(informative=True)
    assert loss < entropy - 1.0 and entropy < math.log(50), (loss, entropy)
