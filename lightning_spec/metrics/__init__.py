"""torchmetrics metrics of draft fidelity and speculative hit rate; functional twins in .functional."""
from lightning_spec.metrics.fidelity import AcceptanceRate, KLDivergence, TokenAgreement, TopKAgreement, TotalVariation
from lightning_spec.metrics.speculative import ExpectedAcceptedLength, ExpectedSpeedup, MeanAcceptedLength, PositionalAcceptance

__all__ = [
    "AcceptanceRate", "ExpectedAcceptedLength", "ExpectedSpeedup", "KLDivergence", "MeanAcceptedLength",
    "PositionalAcceptance", "TokenAgreement", "TopKAgreement", "TotalVariation",
]
