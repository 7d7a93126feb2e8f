"""Public loss API: functional form plus an ``nn.Module`` per loss."""
from kdfast.losses.attention import (
                                     AttentionKLLoss,
                                     AttentionScoreMSELoss,
                                     RelationKLLoss,
                                     attention_kl,
                                     attention_score_mse,
                                     relation_kl,
)
from kdfast.losses.hidden import HiddenMSELoss, hidden_mse
from kdfast.losses.methods import StrategyLoss, distilbert, minilm, minilm_v2, tinybert
from kdfast.losses.types import KDOutput
from kdfast.losses.vocab import FusedLinearKDLoss, KDKLLoss, fused_linear_kd, kd_kl

__all__ = [
    "kd_kl", "fused_linear_kd", "attention_kl", "relation_kl", "attention_score_mse", "hidden_mse",
    "KDKLLoss", "FusedLinearKDLoss", "AttentionKLLoss", "RelationKLLoss", "AttentionScoreMSELoss",
    "HiddenMSELoss", "KDOutput",
    "distilbert", "tinybert", "minilm", "minilm_v2", "StrategyLoss",
]
