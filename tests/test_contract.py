"""The mixer contract (ssmlm/models/blocks.py) over every family, and checkpoints written before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssmlm.models.diag_ssm import DiagSSMLM
from ssmlm.models.h3 import H3LM
from ssmlm.models.hybrid import HybridLM
from ssmlm.models.mamba import MambaLM
from ssmlm.models.s4 import S4LM
from ssmlm.models.s4d import S4DLM
from ssmlm.models.s5 import S5LM
from ssmlm.models.transformer import TransformerLM

FIXTURE = Path(__file__).parent / "fixtures" / "pre_contract_models.pt"
CLASSES = {cls.__name__: cls for cls in (MambaLM, DiagSSMLM, S4DLM, S4LM, S5LM, H3LM, HybridLM, TransformerLM)}
PRE_CONTRACT = torch.load(FIXTURE, weights_only=False)


@pytest.mark.parametrize("name", sorted(PRE_CONTRACT["models"]))
def test_a_model_saved_before_the_contract_loads_and_computes_the_same(name):
    """tests/fixtures/pre_contract_models.pt was written by the code before the contract (its script beside it):
    every family's state dict loads strictly into today's model and gives the logits it gave then."""
    saved = PRE_CONTRACT["models"][name]
    model = CLASSES[saved["cls"]](**saved["kwargs"]).eval()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model(PRE_CONTRACT["tokens"]), saved["logits"], atol=1e-5, rtol=1e-5)
    # as a Lightning checkpoint would hold it: under a prefix, inside another module
    wrapper = torch.nn.ModuleDict({"model": CLASSES[saved["cls"]](**saved["kwargs"])})
    wrapper.load_state_dict({f"model.{k}": v for k, v in saved["state_dict"].items()})


def test_mamba_keeps_mamba_ssm_names():
    saved = PRE_CONTRACT["models"]["mamba_improved"]
    model = MambaLM(**saved["kwargs"])
    assert list(model.state_dict()) == list(saved["state_dict"])
    assert [n for n, _ in model.named_parameters()] != []  # internal names are the backbone's
