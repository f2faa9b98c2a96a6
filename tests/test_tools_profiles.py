"""Profile store: keying, matching, precedence, and the reasons ``buf.config`` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commkit.profiles import (
    DEFAULT_NUM_SMS,
    ClusterSignature,
    Profile,
    cluster_signature,
    find_profile,
    resolve_config,
    save_profile,
)

H800 = ClusterSignature("NVIDIA H800", 132, 16, 8, 160.0, 50.0)


def profile(
    sig: ClusterSignature = H800, num_sms: int = 24, backend: str = "kernels", created: str = "2025-01-01"
) -> Profile:
    return Profile(sig, backend, num_sms, "fastest", "measured", {"chunk_tokens": 128},
                   {"dispatch": 7.5, "combine": 7.0}, created)  # fmt: skip


def test_key_is_stable_and_file_safe() -> None:
    assert H800.key == "nvidia-h800-132sm-16r-8pn-nvl160.0-nic50.0"
    assert ClusterSignature("NVIDIA H800", 132, 16, 8, 160.04, 49.96) == H800  # rounded to 0.1


def test_round_trip_and_per_sm_key(tmp_path: Path) -> None:
    path = save_profile(profile(), tmp_path)
    data = json.loads(path.read_text())
    assert data["per_sm_gbps"] == {"dispatch": 7.5, "combine": 7.0}
    assert Profile.from_dict(data).signature == H800
    assert not list(tmp_path.glob(".tmp-*"))


def test_argument_beats_profile_beats_default(tmp_path: Path) -> None:
    save_profile(profile(), tmp_path)
    explicit = resolve_config(12, signature=H800, profile_directory=tmp_path)
    assert (explicit.num_sms, explicit.source) == (12, "argument")
    from_profile = resolve_config(None, signature=H800, profile_directory=tmp_path)
    assert from_profile.num_sms == 24 and from_profile.source.startswith("profile:")
    assert H800.key in from_profile.reason and dict(from_profile.knobs) == {"chunk_tokens": 128}
    other = ClusterSignature("NVIDIA H800", 132, 32, 8, 160.0, 50.0)
    default = resolve_config(None, signature=other, profile_directory=tmp_path)
    assert (default.num_sms, default.source) == (DEFAULT_NUM_SMS, "default")
    assert "num_ranks 16 != 32" in default.reason


def test_speed_difference_is_not_a_match(tmp_path: Path) -> None:
    save_profile(profile(), tmp_path)
    slower_nic = ClusterSignature("NVIDIA H800", 132, 16, 8, 160.0, 25.0)
    found, why = find_profile(slower_nic, directory=tmp_path)
    assert found is None and "nic_gbps 50.0 != 25.0" in why


def test_backend_filter_and_newest_wins(tmp_path: Path) -> None:
    save_profile(profile(backend="torch", num_sms=8), tmp_path)
    found, why = find_profile(H800, backend="kernels", directory=tmp_path)
    assert found is None and "another backend" in why
    save_profile(profile(num_sms=20, created="2025-01-01"), tmp_path)
    newer = profile(num_sms=28, created="2025-06-01")
    (tmp_path / "copy.json").write_text(json.dumps(newer.to_dict()))
    found, why = find_profile(H800, backend="kernels", directory=tmp_path)
    assert found is not None and found[1].num_sms == 28 and "newest of 2" in why


def test_unreadable_profiles_are_skipped_with_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    save_profile(profile(), tmp_path)
    cfg = resolve_config(None, signature=H800, profile_directory=tmp_path)
    assert cfg.source.startswith("profile:") and "broken.json" in cfg.reason


def test_env_dir_and_plain_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMKIT_PROFILE_DIR", str(tmp_path))
    here = cluster_signature(sysfs_root=tmp_path)
    assert here.num_ranks == 1 and here.nic_gbps == 0.0
    assert resolve_config(None).source == "default"  # the lead's call keeps working
    save_profile(profile(here, num_sms=6, backend="torch"), None)
    cfg = resolve_config(None, backend="torch")
    assert cfg.num_sms == 6 and cfg.source == f"profile:{tmp_path / profile(here, backend='torch').file_name}"
    assert resolve_config(None, use_profiles=False).source == "default"


def test_bad_profile_values_rejected() -> None:
    data = profile().to_dict()
    data["num_sms"] = 0
    with pytest.raises(ValueError, match="num_sms"):
        Profile.from_dict(data)
    for bad in (6.9, "6", True):  # never truncated or coerced
        data = profile().to_dict()
        data["knobs"] = {"internode_dispatch_forwarder_warps": bad}
        with pytest.raises(
            ValueError, match=r"profile knob 'internode_dispatch_forwarder_warps': expected an int"
        ):
            Profile.from_dict(data)
    data["knobs"] = [4]
    with pytest.raises(ValueError, match="profile knobs: expected an object"):
        Profile.from_dict(data)
