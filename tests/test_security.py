"""security.py: names that cannot escape, joins that cannot leave their root, redaction of planted secrets."""

import logging

import pytest

from arm_platform import cli, recipes, security, storage
from arm_platform.config import TrackingConfig, apply_overrides

SECRET = "hunter2-planted-secret"


@pytest.mark.parametrize(
    "name",
    ["../escape", "..", ".", "a/b", "a\\b", ".hidden", "", "tab\there", "line\nbreak", "x" * 201, None, 3],
)
def test_validate_name_refuses_paths_and_odd_names(name):
    with pytest.raises(ValueError, match="sweep_name"):
        security.validate_name(name, "sweep_name")


@pytest.mark.parametrize("name", ["exp1", "pretrain_tiny-3f2a1b", "train-trial_id=ab12_00001", "run.v2", "a..b"])
def test_validate_name_accepts_plain_names(name):
    assert security.validate_name(name, "experiment_name") == name


def test_mlflow_experiment_names_may_be_workspace_paths_but_not_traversals():
    assert TrackingConfig(experiment_name="/Users/me@x.com/arm").experiment_name == "/Users/me@x.com/arm"
    for bad in ("/Users/../../x", "a//b", "ok/\x00"):
        with pytest.raises(ValueError, match="tracking.experiment_name"):
            TrackingConfig(experiment_name=bad)


def test_experiment_name_escape_fails_in_the_config_before_ray():
    """`--experiment_name ../escape` (flag or dotted override) is a ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=r"experiment_name '\.\./escape'"):
        cli.apply_cli(recipes.get("pretrain_tiny"), ["--experiment_name", "../escape"])
    with pytest.raises(ValueError, match="experiment_name"):
        apply_overrides(recipes.get("finetune_tiny"), ["experiment_name=a/../../b"])
    with pytest.raises(ValueError, match="tracking.experiment_name"):
        apply_overrides(recipes.get("finetune_tiny"), ["tracking.experiment_name=../x"])


@pytest.mark.parametrize("root", ["/data/runs", "runs", "s3://bucket/runs"])
def test_safe_join_refuses_results_outside_the_root(root):
    for parts in (("..", "x"), ("a/../../x",), ("../runs-sibling",), ("a", "..", "..")):
        with pytest.raises(ValueError, match="outside"):
            storage.join(root, *parts)
    assert storage.join(root, "exp", "/checkpoint_0/") == f"{root}/exp/checkpoint_0"


def test_safe_join_keeps_normal_results_and_s3_refuses_dot_segments():
    assert storage.join("./runs/", "a") == "./runs/a"  # unchanged string for normal paths (many callers)
    assert storage.join("/data", "a/../b") == "/data/a/../b"  # resolves inside: allowed locally
    with pytest.raises(ValueError, match="outside"):
        storage.join("s3://bucket/p", "a/../b")  # S3 keys are literal: never "a/../b"
    with pytest.raises(ValueError, match="outside"):
        storage.join("s3://bucket", "..", "other-bucket")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"http://user:{SECRET}@mlflow:5000/x", "http://user:***@mlflow:5000/x"),
        (f"postgresql+psycopg2://arm:{SECRET}@db/mlflow", "postgresql+psycopg2://arm:***@db/mlflow"),
        (f"https://{SECRET}@github.com/o/r.git", "https://***@github.com/o/r.git"),
        (f"s3://b/k?X-Amz-Signature={SECRET}&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
        (f"https://h/p?a=1&token={SECRET}#f", "https://h/p?a=1&token=***#f"),
        (f"https://h/p?sig={SECRET}&key={SECRET}&sv=2020", "https://h/p?sig=***&key=***&sv=2020"),
        (f"env AWS_SECRET_ACCESS_KEY={SECRET} ok", "env AWS_SECRET_ACCESS_KEY=*** ok"),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer ***"),
        ("key id AKIAABCDEFGHIJKLMNOP here", "key id *** here"),
        ("s3://bucket/key@v1 and http://host:8080/a@b", "s3://bucket/key@v1 and http://host:8080/a@b"),
        ("num_tokens=12 monkey=3 data_path=s3://b/x", "num_tokens=12 monkey=3 data_path=s3://b/x"),
    ],
)
def test_redact_text(text, expected):
    assert security.redact(text) == expected


def test_redact_dicts_recursively_and_returns_a_copy():
    cfg = {
        "tracking": {"tracking_uri": f"http://u:{SECRET}@h", "experiment_name": "x"},
        "env": {"AWS_SECRET_ACCESS_KEY": SECRET, "aws_session_token": SECRET, "AWS_REGION": "us-east-1"},
        "tracking.password": SECRET,
        "sessionToken": SECRET,
        "AWSAccessKeyId": SECRET,
        "client_secret": None,
        "list": [f"https://h?token={SECRET}", ("t", {"api-key": SECRET})],
        "steps": 3,
    }
    out = security.redact(cfg)
    assert SECRET not in repr(out) and SECRET in repr(cfg)
    assert out["tracking"] == {"tracking_uri": "http://u:***@h", "experiment_name": "x"}
    assert out["env"]["AWS_REGION"] == "us-east-1" and out["env"]["aws_session_token"] == "***"
    assert out["client_secret"] is None and out["steps"] == 3 and isinstance(out["list"][1], tuple)


def test_is_secret_key_matches_words_not_substrings():
    assert all(map(security.is_secret_key, ["MLFLOW_TRACKING_PASSWORD", "X-Amz-Credential", "sig", "secretKey"]))
    assert not any(map(security.is_secret_key, ["tokenizer", "num_tokens", "author", "RAY_AUTH_MODE", "keys"]))


def test_redacting_filter_and_record_factory_hide_planted_secrets(caplog):
    log = logging.getLogger("arm_platform.test_security")
    handler_filter = security.RedactingFilter()
    record = log.makeRecord(log.name, logging.INFO, __file__, 1, "uri %s", (f"http://u:{SECRET}@h",), None)
    assert handler_filter.filter(record) and record.getMessage() == "uri http://u:***@h"
    previous = logging.getLogRecordFactory()
    try:
        security.install_log_redaction()
        security.install_log_redaction()  # idempotent: one wrapper
        with caplog.at_level(logging.INFO, logger=log.name):
            log.info("tracking %s", f"http://u:{SECRET}@h")
            try:
                raise RuntimeError(f"connect http://u:{SECRET}@h failed")
            except RuntimeError:
                log.exception("with traceback")
    finally:
        logging.setLogRecordFactory(previous)
    assert "http://u:***@h" in caplog.text and SECRET not in caplog.text
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_redaction_leaves_secret_free_configs_unchanged(name):
    """Safe to apply to every config.json / arm_run.json / MLflow param: no config key or value is a false hit."""
    cfg = apply_overrides(recipes.get(name), {"data.data_path": "s3://bucket/in1k?versionId=3", "seed": 7})
    assert security.redact(cfg.to_dict()) == cfg.to_dict()
    with_secret = apply_overrides(cfg, {"tracking.tracking_uri": f"https://arm:{SECRET}@mlflow.internal"})
    assert SECRET not in repr(security.redact(with_secret.to_dict()))
