"""``Buffer`` takes its SM budget from the argument, a matching tuning profile, or the default."""

from __future__ import annotations

import os
from pathlib import Path

import commkit
from commkit.launch import spawn_gloo
from commkit.profiles import DEFAULT_NUM_SMS, Profile, cluster_signature, save_profile


def configs(rank: int, world: int, profile_dir: str) -> list[tuple[int, str, str]]:
    os.environ["COMMKIT_PROFILE_DIR"] = profile_dir
    out = []
    for num_sms in (None, 7):
        cfg = commkit.Buffer(backend="torch", num_sms=num_sms).config
        out.append((cfg.num_sms, cfg.source, cfg.reason))
    return out


def write_profile(rank: int, world: int, profile_dir: str) -> str:
    sig = cluster_signature()  # this machine, this group
    return str(save_profile(Profile(sig, "torch", 13, "fastest", "test", {}, {}, "2026-01-01"), profile_dir))


def test_argument_beats_profile_beats_default(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (no_profile, explicit), _ = spawn_gloo(configs, 2, str(empty))
    assert no_profile[:2] == (DEFAULT_NUM_SMS, "default") and "no num_sms given" in no_profile[2]
    assert explicit[:2] == (7, "argument")

    store = tmp_path / "profiles"
    path = spawn_gloo(write_profile, 2, str(store))[0]
    (from_profile, explicit), _ = spawn_gloo(configs, 2, str(store))
    assert from_profile[:2] == (13, f"profile:{path}")
    assert explicit[:2] == (7, "argument")


def node_configs(rank: int, world: int, profile_dir: str) -> tuple[int, int]:
    """A profile tuned for 2 ranks per node: found by Buffer(num_ranks_per_node=2), not by Buffer()."""
    import dataclasses

    os.environ.pop("LOCAL_WORLD_SIZE", None)
    os.environ["COMMKIT_PROFILE_DIR"] = profile_dir
    if rank == 0:
        sig = dataclasses.replace(cluster_signature(), num_ranks_per_node=2)
        save_profile(Profile(sig, "torch", 11, "fastest", "test", {}, {}, "2026-01-01"), profile_dir)
    import torch.distributed as dist

    dist.barrier()
    two = commkit.Buffer(backend="torch", num_ranks_per_node=2).config.num_sms
    one = commkit.Buffer(backend="torch").config.num_sms
    return two, one


def test_profiles_match_the_buffers_ranks_per_node(tmp_path: Path) -> None:
    for two, one in spawn_gloo(node_configs, 4, str(tmp_path / "profiles")):
        assert (two, one) == (11, DEFAULT_NUM_SMS)
