"""The node's configuration and command line: defaults documented, bad values refused in one line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import yaml

from dp_model.config import ConfigError, load_config, to_mapping
from pacs_node.cli import main
from pacs_node.config import Destination, NodeConfig, WebDestination, parse_destination

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_documented_node_config_lists_exactly_the_defaults() -> None:
    assert load_config(NodeConfig, CONFIGS / "node.yaml") == NodeConfig()
    assert yaml.safe_load((CONFIGS / "node.yaml").read_text()) == to_mapping(NodeConfig())


def test_destination_parsing() -> None:
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert (
        str(Destination.parse(" ORTHANC@pacs.example.org:4242 ")) == "ORTHANC@pacs.example.org:4242"
    )
    for bad in (
        "PACS@host",
        "host:104",
        "PACS@host:0",
        "PACS@host:70000",
        "A_TITLE_LONGER_THAN_16@h:1",
    ):
        with pytest.raises(ValueError, match="destination"):
            Destination.parse(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ae_title": "A\\B"}, "ae_title must be 1 to 16"),
        ({"ae_title": "ABCDEFGHIJKLMNOPQ"}, "ae_title must be 1 to 16"),
        ({"port": 70000}, "port must be from 0"),
        ({"destinations": ["PACS@host"]}, "destination must be AET@host:port"),
        ({"destinations": ["PACS@h:104", "PACS@h:104"]}, "destinations must be distinct"),
        ({"operating_point": 1.5}, "operating_point must be between 0 and 1"),
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"overlay_modality": "MR"}, "overlay_modality must be source or OT"),
        (
            {"overlay_transfer_syntax": "jpeg"},
            "overlay_transfer_syntax must be explicit or jpeg-ls",
        ),
        (
            {"tls.cert": "/nonexistent.pem", "tls.key": "/nonexistent.key"},
            "tls.cert must be an existing PEM file",
        ),
        ({"tls.cert": "x.pem"}, "tls.cert and tls.key must be given together"),
        (
            {"outbox.initial_backoff_s": 10.0, "outbox.max_backoff_s": 1.0},
            "outbox.initial_backoff_s",
        ),
        ({"max_dataset_mb": 0}, "max_dataset_mb must be at least 1"),
        ({"max_pdu_bytes": 0}, "max_pdu_bytes must be from 4096 to 4194304"),
        ({"max_pdu_bytes": 2**23}, "max_pdu_bytes must be from 4096 to 4194304"),
        ({"handshake_timeout_s": 0.0}, "handshake_timeout_s must be above 0"),
        ({"retention.skipped_days": -1.0}, "retention.skipped_days must be 0"),
        ({"allow_networks": ["not-a-network"]}, "allow_networks must be addresses or networks"),
        (
            {"destinations": ["ftp://pacs.example/dicom-web"]},
            "destinations[0]: destination must be AET@host:port or a DICOMweb URL",
        ),
        (
            {"destinations": ["PACS@h:104", "https:///dicom-web"]},
            "destinations[1]: url must be an http:// or https:// URL with a host",
        ),
        (
            {"destinations": ["https://pacs.example/dicom-web?x=1"]},
            "url must be an http:// or https:// URL with a host",
        ),
        (
            {"destinations": ["https://pacs.example/dicom-web", "https://pacs.example/dicom-web/"]},
            "destinations must be distinct",
        ),
        (
            {"destinations": ["http://pacs.example/dicom-web"], "tls.send": True},
            "destinations[0] must be https:// when tls.send is true",
        ),
        (
            {"destinations": [{"url": "https://pacs.example/dicom-web", "auth": "kerberos"}]},
            "destinations[0].auth: expected one of",
        ),
        (
            {"destinations": [{"url": "https://pacs.example/dicom-web", "auth": "bearer"}]},
            "destinations[0]: secret_file or secret_env must be",
        ),
        (
            {"destinations": [{"url": "https://pacs.example/dicom-web", "secret_env": "HOME"}]},
            "destinations[0]: secret_file or secret_env must be",
        ),
        (
            {
                "destinations": [
                    {"url": "https://pacs.example/dicom-web", "auth": "basic", "secret_env": "HOME"}
                ]
            },
            "destinations[0]: user must be",
        ),
        (
            {
                "destinations": [
                    {
                        "url": "https://pacs.example/dicom-web",
                        "auth": "basic",
                        "user": "dp",
                        "secret_file": "/nonexistent",
                    }
                ]
            },
            "destinations[0]: secret_file must be a readable file",
        ),
        (
            {
                "destinations": [
                    {
                        "url": "https://pacs.example/dicom-web",
                        "auth": "bearer",
                        "secret_env": "DP_TEST_NEVER_SET",
                    }
                ]
            },
            "destinations[0]: secret_env must be the name of a set",
        ),
        ({"outbox.max_request_mb": 0}, "outbox.max_request_mb must be at least 1"),
        ({"scale.lease_s": 1}, "scale.lease_s must be from 2 to 3600 seconds"),
        ({"scale.take": 0}, "scale.take must be from 1 to 256"),
        ({"scale.node_name": "Node A"}, "scale.node_name must be lower-case letters"),
        (
            {"scale.database": "host=db", "max_dataset_mb": 1024},
            "max_dataset_mb must be at most 1000 in the scale-out mode",
        ),
        ({"overlay_max_side": 10**10}, "overlay_max_side must be from 256 to 65535"),
    ],
)
def test_bad_values_are_refused_with_their_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(NodeConfig, None, overrides)


def test_a_url_destination_is_a_stow_rs_endpoint_with_its_secret_read_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = parse_destination(" https://pacs.example:8443/dicom-web/ ")
    assert isinstance(web, WebDestination) and (web.host, web.port, web.stow_path) == (
        "pacs.example",
        8443,
        "/dicom-web/studies",
    )
    assert (
        str(web) == "https://pacs.example:8443/dicom-web"
        and web.name != Destination.parse("PACS@pacs.example:8443").name
    )
    assert parse_destination("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    secret = tmp_path / "pacs.secret"
    secret.write_text("s3cret-password\n")
    monkeypatch.setenv("DP_TEST_TOKEN", "t0ken")
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "destinations": [
                    "PACS@10.0.0.5:104",
                    "http://127.0.0.1:8042/dicom-web",
                    {
                        "url": "https://pacs.example/dicom-web",
                        "auth": "basic",
                        "user": "dpnode",
                        "secret_file": str(secret),
                    },
                    {
                        "url": "https://other.example/dicom-web",
                        "auth": "bearer",
                        "secret_env": "DP_TEST_TOKEN",
                    },
                ],
                "tls": {"send": True},
            }
        )
    )
    config = load_config(NodeConfig, path)
    kinds = [type(d).__name__ for d in config.parsed_destinations()]
    # http to loopback stays allowed
    assert kinds == ["Destination", "WebDestination", "WebDestination", "WebDestination"]
    assert [d.read_secret() for d in config.parsed_destinations()[2:]] == [
        "s3cret-password",
        "t0ken",
    ]
    assert "s3cret" not in repr(config) and "t0ken" not in repr(config)
    # cleartext only without tls.send
    assert (
        load_config(NodeConfig, None, {"destinations": ["http://pacs.example/dicom-web"]}).tls.send
        is False
    )


def test_a_secret_given_in_the_configuration_is_never_echoed_in_the_error() -> None:
    for destinations in (
        ["https://dpnode:hunter2@pacs.example/dicom-web"],
        [{"url": "https://pacs.example/dicom-web", "password": "hunter2"}],
    ):
        with pytest.raises(ConfigError) as raised:
            load_config(NodeConfig, None, {"destinations": destinations})
        assert "destinations[0]" in str(raised.value) and "hunter2" not in str(raised.value)
    for database in ("host=db user=dp password=hunter2", "postgresql://dp:hunter2@db/dp"):
        with pytest.raises(ConfigError) as raised:
            load_config(NodeConfig, None, {"scale.database": database})
        assert "passfile" in str(raised.value) and "hunter2" not in str(raised.value)


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    from pacs_node.cli import load, parser

    path = tmp_path / "node.yaml"
    path.write_text("port: 2000\nae_title: FROMFILE\nbundle: some/bundle\n")
    argv = [
        "--config",
        str(path),
        "--port",
        "3000",
        "--destination",
        "A@h:1",
        "--destination",
        "B@h:2",
        "--allow",
        "CT1",
        "--allow-network",
        "10.1.0.0/16",
    ]
    config = load(parser().parse_args(argv))
    assert (config.port, config.ae_title, config.bundle) == (3000, "FROMFILE", "some/bundle")
    assert (
        config.destinations == ("A@h:1", "B@h:2")
        and config.allow == ("CT1",)
        and config.allow_networks == ("10.1.0.0/16",)
    )
    assert (
        not config.allow_any_caller
        and load(parser().parse_args([*argv, "--allow-any-caller"])).allow_any_caller
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "-5", "--bundle", "x"], "port must be from 0"),
        (["--destination", "nonsense", "--bundle", "x"], "destination must be AET@host:port"),
        (
            ["--bundle", "/no/such/bundle", "--port", "0", "--metrics-port", "-1"],
            "bundle /no/such/bundle does not exist",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main([*argv, "--spool", str(tmp_path / "spool")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file_as_a_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"dp-node: {tmp_path / 'nope.yaml'}: file not found"
    )


def float_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of ``cls`` that holds a number with a fraction, nested sections included."""
    hints, keys = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float or float in get_args(hint):
            keys.append(prefix + f.name)
    return keys


@pytest.mark.parametrize("value", [1e10, math.inf, math.nan])
@pytest.mark.parametrize("key", float_keys(NodeConfig))
def test_every_number_of_seconds_or_days_is_one_a_socket_or_a_lock_can_take(
    key: str, value: float
) -> None:
    """Timeouts, backoffs and bounds reach socket timeouts and lock waits (or comparisons that
    nan and inf make meaningless): beyond what those calls take, every association would die
    of an OverflowError; the key is refused at load, by name."""
    assert {
        "acse_timeout_s",
        "handshake_timeout_s",
        "outbox.max_backoff_s",
        "retention.failed_days",
    } <= set(float_keys(NodeConfig))
    with pytest.raises(ConfigError, match=re.escape(f"{key} must be")):
        load_config(NodeConfig, None, {key: value})


@pytest.mark.parametrize("text", [".inf", ".nan"])
def test_a_timeout_of_inf_or_nan_in_the_file_is_one_line_and_exit_code_2(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"acse_timeout_s: {text}\nbundle: x\nspool: {tmp_path / 'spool'}\n")
    code = main(["--config", str(path)])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "acse_timeout_s must be above 0 and at most 86400 s" in err
        and err.count("\n") == 1
    ), err


def test_a_timeout_beyond_what_a_socket_takes_stops_dp_node_with_one_line_not_a_traceback(
    tmp_path: Path, demo_bundle: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"bundle: {demo_bundle}\nspool: {tmp_path / 'spool'}\nport: 0\nmetrics_port: -1\nnetwork_timeout_s: 1.0e+10\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        == f"dp-node: {path}: network_timeout_s must be above 0 and at most 86400 s, got 10000000000.0"
    )
