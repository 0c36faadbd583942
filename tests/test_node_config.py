"""The node's configuration and command line: defaults documented, bad values refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dp_model.config import ConfigError, load_config, to_mapping
from pacs_node.cli import main
from pacs_node.config import Destination, NodeConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_documented_node_config_lists_exactly_the_defaults() -> None:
    assert load_config(NodeConfig, CONFIGS / "node.yaml") == NodeConfig()
    assert yaml.safe_load((CONFIGS / "node.yaml").read_text()) == to_mapping(NodeConfig())


def test_destination_parsing() -> None:
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert str(Destination.parse(" ORTHANC@pacs.example.org:4242 ")) == "ORTHANC@pacs.example.org:4242"
    for bad in ("PACS@host", "host:104", "PACS@host:0", "PACS@host:70000", "A_TITLE_LONGER_THAN_16@h:1"):
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
        ({"tls.cert": "/nonexistent.pem", "tls.key": "/nonexistent.key"}, "tls.cert must be an existing PEM file"),
        ({"tls.cert": "x.pem"}, "tls.cert and tls.key must be given together"),
        ({"outbox.initial_backoff_s": 10.0, "outbox.max_backoff_s": 1.0}, "outbox.initial_backoff_s"),
        ({"max_dataset_mb": 0}, "max_dataset_mb must be at least 1"),
        ({"handshake_timeout_s": 0.0}, "handshake_timeout_s must be above 0"),
        ({"retention.skipped_days": -1.0}, "retention.skipped_days must be 0"),
        ({"allow_networks": ["not-a-network"]}, "allow_networks must be addresses or networks"),
    ],
)
def test_bad_values_are_refused_with_their_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(NodeConfig, None, overrides)


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    from pacs_node.cli import load, parser

    path = tmp_path / "node.yaml"
    path.write_text("port: 2000\nae_title: FROMFILE\nbundle: some/bundle\n")
    argv = ["--config", str(path), "--port", "3000", "--destination", "A@h:1", "--destination", "B@h:2", "--allow", "CT1", "--allow-network", "10.1.0.0/16"]
    config = load(parser().parse_args(argv))
    assert (config.port, config.ae_title, config.bundle) == (3000, "FROMFILE", "some/bundle")
    assert config.destinations == ("A@h:1", "B@h:2") and config.allow == ("CT1",) and config.allow_networks == ("10.1.0.0/16",)
    assert not config.allow_any_caller and load(parser().parse_args([*argv, "--allow-any-caller"])).allow_any_caller


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "-5", "--bundle", "x"], "port must be from 0"),
        (["--destination", "nonsense", "--bundle", "x"], "destination must be AET@host:port"),
        (["--bundle", "/no/such/bundle", "--port", "0", "--metrics-port", "-1"], "not a Deep Pneumonia bundle"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_code_2(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main([*argv, "--spool", str(tmp_path / "spool")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file_as_a_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pacs_node.cli", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"dp-node: {tmp_path / 'nope.yaml'}: file not found"
