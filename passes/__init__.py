"""Graph passes on ``torch.fx.GraphModule`` (installed as ``qcompile.passes``)."""
from .base import Pass, PassError, PassManager, PassResult, Pipeline, VerificationError, verify
from .cleanup import EliminateDeadCode, RemoveIdentity

__all__ = ["Pass", "PassResult", "Pipeline", "PassManager", "PassError", "VerificationError", "verify",
           "EliminateDeadCode", "RemoveIdentity"]
