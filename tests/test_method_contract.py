"""The contract every method in conf/method/ must keep: a finite loss, gradients that reach the
model, state that survives a checkpoint round trip (weights_only), and an eval model that is the
plain backbone."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from tests.method_utils import batches, build_method, tiny_context

METHODS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf/method").glob("*.yaml")
)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, tmp_path):
    cfg, ctx, runner = tiny_context(tmp_path, [f"method={name}"])
    method, model = build_method(cfg, ctx, runner)
    params = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    method.on_epoch_start(0, 2)
    model.train()
    for step, batch in enumerate(batches(ctx, method)):
        out = method.training_step(model, batch)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), name
        assert out.logits.shape[-1] == ctx.data.spec.num_classes
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), (
            f"{name}: no gradient reaches the model"
        )
        assert model.classifier.weight.grad is not None
        for v in out.logs.values():
            assert v.dim() == 0 and not v.requires_grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 2:
            break
    method.on_epoch_end(0)
    state = roundtrip(method.state_dict())
    fresh_cfg, fresh_ctx, fresh_runner = tiny_context(tmp_path, [f"method={name}"])
    fresh, _ = build_method(fresh_cfg, fresh_ctx, fresh_runner)
    fresh.load_state_dict(state)
    for key, value in method.state_dict().items():
        other = fresh.state_dict()[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), f"{name}: {key} changed in the round trip"
        else:
            assert value == other, f"{name}: {key} changed in the round trip"
    exported = method.eval_model(model)
    assert sum(p.numel() for p in exported.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
