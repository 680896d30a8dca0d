"""Every cluster YAML in the repo passes the installed Ray's own cluster-config checks, offline.

`ray up` runs `prepare_config` (fill in the provider's defaults.yaml, merge setup commands, per-node-type
worker limits) and `validate_config` (Ray's ray-schema.json, where unknown keys are errors, plus cross-field
checks) before it touches a cloud. Neither needs credentials, so a typo in a cluster file fails here, in CI,
instead of minutes into a launch.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
# Settings the driver and the docs rely on; every cluster file defines them in its first setup command.
SITE_SETTINGS = ("RAY_AUTH_MODE", "STUDY_STORAGE", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                 "MLFLOW_TRACKING_URI")


def ray_checks(config: dict) -> dict:
    """What `ray up` does to a config before launching anything; raises on an invalid one."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_repo_ships_both_cluster_files():
    assert {p.name for p in CLUSTER_FILES} >= {"cluster.yaml", "cluster-local.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_own_validation(path):
    prepared = ray_checks(load(path))
    head = prepared["head_node_type"]
    workers = [t for t in prepared["available_node_types"] if t != head] or [head]   # local: one node type
    assert prepared["max_workers"] >= 1
    assert all(prepared["available_node_types"][t]["max_workers"] >= 1 for t in workers)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_misspelt_or_mistyped_keys_are_rejected(path):
    config = load(path)
    misspelt = copy.deepcopy(config)
    misspelt["setup_comands"] = misspelt.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        ray_checks(misspelt)

    mistyped = copy.deepcopy(config)
    mistyped["idle_timeout_minutes"] = "ten"
    with pytest.raises(Exception, match="'ten' is not of type 'number'"):
        ray_checks(mistyped)


def test_misspelt_node_type_key_is_rejected():
    config = load(REPO / "cluster.yaml")
    config["available_node_types"]["gpu_g5"]["min_worker"] = 1   # not min_workers
    with pytest.raises(Exception, match="min_worker"):
        ray_checks(config)


def test_aws_cluster_has_a_cpu_head_and_several_spot_single_gpu_worker_types_in_rays_image():
    config = load(REPO / "cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [types[t] for t in types if t != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0   # no trials on the head
    assert len({w["node_config"]["InstanceType"] for w in workers}) >= 3  # more spot capacity to draw from
    for worker in workers:
        assert worker["resources"]["GPU"] == 1
        assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    docker = config["docker"]
    assert docker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"  # the tested Ray, with CUDA
    assert docker["head_image"].startswith(f"rayproject/ray:{ray.__version__}-")


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_pins_ray_and_the_project_and_holds_no_secrets(path):
    text = path.read_text()
    config = load(path)
    install = " ".join(config["setup_commands"])
    # Ray is pinned to the tested version: by the docker image's tag, or by pip where nodes have no image.
    pins = re.findall(r'ray\[[a-z,]+\]==([0-9.]+)', install) or re.findall(r'rayproject/ray:([0-9.]+)-',
                                                                         config.get("docker", {}).get("image", ""))
    assert pins == [ray.__version__], f"{path.name}: pin ray to the tested version {ray.__version__}, found {pins}"
    # Whatever wheel dist/ holds: no version in the file, so a version bump needs no edit here.
    assert "dist/caption_study-*.whl" in install, f"{path.name}: install the wheel in dist/ by pattern"
    assert not re.search(r"caption_study-[0-9]", install), f"{path.name}: a hard-coded wheel version"
    for secret in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id", r"PRIVATE KEY-----",
                   r"[0-9a-f]{64}"):   # the last: a Ray auth token pasted in
        assert not re.search(secret, text, re.I), f"{path.name} contains something like a credential: {secret}"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_site_settings_live_in_one_place_and_token_auth_reaches_every_node(path):
    config = load(path)
    first = config["setup_commands"][0]
    assert "caption-study.env" in first
    for name in SITE_SETTINGS:
        assert f"export {name}=" in first, f"{path.name}: {name} missing from the site settings command"
    everything_else = yaml.safe_dump({k: v for k, v in config.items() if k != "setup_commands"})
    everything_else += " ".join(config["setup_commands"][1:])
    assert "s3://" not in everything_else and "sqlite:" not in everything_else, \
        f"{path.name}: storage/tracking locations belong only in the site settings command"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("--head" in c and "--dashboard-host" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
