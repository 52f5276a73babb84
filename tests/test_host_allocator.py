"""The engine's malloc settings: freed activation memory is reused instead of being faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mask2former.host_allocator import USER_SETTINGS, configure_host_allocator

ROOT = Path(__file__).resolve().parents[1]

# Training steps of a small Mask2Former (the benchmark's small configuration at 128x128, one thread).
PROBE = """
import resource, sys, torch
from mask2former.host_allocator import configure_host_allocator
from mask2former.model import build_backbone, build_mask2former
applied = configure_host_allocator() if sys.argv[1] == "engine" else False
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_mask2former(backbone=build_backbone(type=None, embed_dim=32, depths=[1, 1, 1, 1],
                                                  num_heads=[1, 2, 4, 8]),
                          num_classes=133, num_queries=20, hidden_dim=64, convs_dim=64, mask_dim=64).train()
optimizer = torch.optim.AdamW(model.parameters())
images = torch.randn(1, 3, 128, 128)
def step():
    out = model(images)
    loss = out["pred_masks"].sum() + sum(aux["pred_masks"].sum() for aux in out["aux_outputs"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
windows = []
for _ in range(4):  # the quietest of four windows: other processes' memory pressure adds faults now and then
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print(applied, min(windows))
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, float(faults)


def test_engine_settings_stop_the_page_faults_of_each_step():
    default_applied, default_faults = _faults_per_step("default")
    engine_applied, engine_faults = _faults_per_step("engine")
    assert engine_applied == "True" and default_applied == "False"
    # activations faulted in again, zero-filled, every step: about 1000 on an idle machine; fewer when other
    # processes (a parallel test run) keep the allocator's freed pages warm
    assert default_faults > 200, default_faults
    assert engine_faults < default_faults / 5, (engine_faults, default_faults)


def test_a_users_own_malloc_configuration_is_left_alone():
    for name in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD"):
        assert configure_host_allocator({name: "x"}) is False
