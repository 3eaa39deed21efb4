"""engine.ops.forward_mode: forward-mode AD from several threads at once (pass 2's producer threads).

torch's forward-mode levels are process-wide: bare ``torch.func.jvp`` in three threads at once fails ("no level
exists" / "invalid index") within a few hundred calls; the engine's locked ``jvp`` gives every thread its right
derivative."""

from __future__ import annotations

import threading

import torch

from engine.ops.forward_mode import jvp


def test_jvp_from_several_threads_at_once_is_right():
    w = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w).sum() * x.sum()

    errors: list[BaseException] = []
    wrong: list[float] = []

    def run(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(200):
                x = torch.randn(32, 32, dtype=torch.float64, generator=gen)
                v = torch.randn(32, 32, dtype=torch.float64, generator=gen)
                value, tangent = jvp(f, (x,), (v,))
                x2 = x.clone().requires_grad_(True)
                ref = (torch.autograd.grad(f(x2), x2)[0] * v).sum()
                if not (torch.allclose(tangent, ref, rtol=1e-10) and torch.equal(value, f(x))):
                    wrong.append(float(tangent - ref))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    assert not errors, errors[:2]
    assert not wrong, wrong[:5]
