"""The node's configuration: ``configs/node.yaml`` plus command-line overrides, validated once.

The dataclass defaults are the embedded default (``configs/node.yaml`` repeats them, and a
test keeps the two equal). Every bad value stops the node at start-up with one line that
names the key, never later while images arrive.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from dp_model.config import require

#: PS3.5 6.2: an AE title is 1 to 16 characters of the default repertoire, no backslash.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")
DESTINATION_FORMS = "AET@host:port or a DICOMweb URL (http:// or https://)"
#: The longest timeout, backoff or stall bound the node takes: a day. Socket timeouts and
#: lock waits take no more than ``threading.TIMEOUT_MAX`` (about 292 years) and fail with an
#: OverflowError beyond it, on every association; nothing the node waits for needs a day.
MAX_WAIT_S = 86400.0
#: The longest age the node compares with (dead letters, retention): ten years.
MAX_AGE_DAYS = 3650.0
#: PS3.3 C.7.6.3.1: Rows and Columns are US, so no image side exceeds 65535 pixels.
MAX_IMAGE_SIDE = 65535
#: Most associations the node opens to one destination at once (outbox.associations).
MAX_ASSOCIATIONS = 16
#: The largest PDU the node reads (``max_pdu_bytes`` is at most this): an A-ASSOCIATE-RQ is a
#: few kB, a P-DATA PDU at most the maximum length the node announces. A peer announcing more
#: is not read.
MAX_PDU_BYTES = 4 * 2**20


def check_ae_title(name: str, value: str) -> None:
    require(
        bool(AE_TITLE.match(value)) and value.strip() != "",
        name,
        value,
        "1 to 16 printable ASCII characters, no backslash",
    )


def check_seconds(name: str, value: float, most: float = MAX_WAIT_S) -> None:
    """A duration in seconds: finite, above 0 and at most ``most`` (nan, inf and 1e10 never reach a socket or a lock)."""
    require(_finite(value) and 0 < value <= most, name, value, f"above 0 and at most {most:g} s")


def check_days(name: str, value: float) -> None:
    """An age limit in days: 0 (no limit) up to :data:`MAX_AGE_DAYS`."""
    require(
        _finite(value) and 0 <= value <= MAX_AGE_DAYS,
        name,
        value,
        f"0 (no limit) to {MAX_AGE_DAYS:g} days",
    )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (a name or an address in 127.0.0.0/8 or ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Destination:
    """Where results are sent: ``AET@host:port``."""

    ae_title: str
    host: str
    port: int
    #: Every DICOM output kind the node writes goes over C-STORE.
    outputs: tuple[str, ...] = ()
    protocol = "dimse"

    @staticmethod
    def parse(text: str) -> Destination:
        match = DESTINATION.match(text.strip())
        require(match is not None, "destination", text, DESTINATION_FORMS)
        assert match is not None
        port = int(match["port"])
        require(0 < port < 65536, "destination port", text, "from 1 to 65535")
        check_ae_title("destination AE title", match["ae"])
        return Destination(match["ae"], match["host"], port)

    @property
    def name(self) -> str:
        """Folder-safe name of the destination's outbox."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.ae_title}@{self.host}_{self.port}")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class WebDestination:
    """A DICOMweb service that takes results by STOW-RS (PS3.18 10.5) at ``<url>/studies``.

    Attributes:
        url: the service's base URL, ``https://pacs.example/dicom-web``; no user, password,
            query or fragment in it.
        auth: ``none``, ``basic`` (``user`` and a password) or ``bearer`` (a token).
        user: the user name for ``basic``.
        secret_file, secret_env: where the password or token is, a file or an environment
            variable (one of the two): never the secret itself in the configuration. It is
            read again for every request, so that a renewed token needs no restart.
        protocol: how results reach it (:mod:`pacs_node.delivery.registry`): ``stow-rs``, or
            ``fhir`` for a FHIR server (the worklist message, output ``fhir``).
        outputs: the output kinds it takes; empty: every kind its protocol carries.
    """

    url: str
    _: KW_ONLY
    auth: Literal["none", "basic", "bearer"] = "none"
    user: str = ""
    secret_file: str = ""
    secret_env: str = ""
    protocol: str = "stow-rs"
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(
            bool(OUTPUT_NAME.fullmatch(self.protocol)),
            "protocol",
            self.protocol,
            "a protocol's name, such as stow-rs",
        )
        _require_kinds(self.outputs, "outputs", empty=True)
        parts = _url_parts(self.url)
        require(
            not parts.username and not parts.password,
            "url",
            _shown(parts),
            "free of a user or password (set user, and secret_file or secret_env)",
        )
        require(
            self.auth in ("none", "basic", "bearer"), "auth", self.auth, "none, basic or bearer"
        )
        has_secret = bool(self.secret_file) + bool(self.secret_env)
        require(
            has_secret == (self.auth != "none"),
            "secret_file or secret_env",
            self.secret_file or self.secret_env,
            "one of the two with basic or bearer auth, neither without",
        )
        require(
            self.auth != "basic" or (bool(self.user) and ":" not in self.user),
            "user",
            self.user,
            "a user name without ':' for basic auth",
        )
        if self.auth != "none":
            self.read_secret()

    def read_secret(self) -> str:
        """The password or token (ValueError naming the key when it cannot be had)."""
        if self.secret_env:
            secret = os.environ.get(self.secret_env, "").strip()
            require(
                bool(secret),
                "secret_env",
                self.secret_env,
                "the name of a set, non-empty environment variable",
            )
        else:
            try:
                secret = Path(self.secret_file).read_text().strip()
            except (OSError, UnicodeDecodeError):
                secret = ""
            require(
                bool(secret),
                "secret_file",
                self.secret_file,
                "a readable file holding the password or token",
            )
        key = "secret_env" if self.secret_env else "secret_file"
        require(
            secret.isprintable(),
            key,
            self.secret_env or self.secret_file,
            "one line of printable characters",
        )
        return secret

    @property
    def parts(self) -> SplitResult:
        return urlsplit(self.url.strip())

    @property
    def host(self) -> str:
        return self.parts.hostname or ""

    @property
    def port(self) -> int:
        return self.parts.port or (443 if self.https else 80)

    @property
    def https(self) -> bool:
        return self.parts.scheme == "https"

    @property
    def base_path(self) -> str:
        return self.parts.path.rstrip("/")

    @property
    def stow_path(self) -> str:
        """Where STOW-RS requests go (PS3.18 10.5.1)."""
        return f"{self.base_path}/studies"

    @property
    def cleartext(self) -> bool:
        """Whether results would cross a network unencrypted."""
        return not self.https and not is_loopback(self.host)

    @property
    def name(self) -> str:
        """Folder-safe name of the destination's outbox."""
        return re.sub(
            r"[^A-Za-z0-9_.-]", "_", f"{self.parts.scheme}_{self.host}_{self.port}{self.base_path}"
        )

    def __str__(self) -> str:
        return f"{self.parts.scheme}://{self.parts.netloc}{self.base_path}"


def _url_parts(url: str) -> SplitResult:
    expected = "an http:// or https:// URL with a host (a port from 1 to 65535), no query"
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # a broken IPv6 address
        raise ValueError(
            f"url must be {expected}, got {url.split('://')[0] + '://...'!r}"
        ) from None
    try:
        port_ok = parts.port != 0
    except ValueError:  # not a number, or beyond 65535
        port_ok = False
    ok = (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and port_ok
        and not parts.query
        and not parts.fragment
    )
    require(ok, "url", _shown(parts), expected)
    return parts


def _shown(parts: SplitResult) -> str:
    """A URL as an error message may show it: any user or password withheld."""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"<withheld>@{host}" if "@" in parts.netloc else host).geturl()


def parse_destination(text: str) -> Destination | WebDestination:
    """``AET@host:port`` (C-STORE) or an http(s) URL (STOW-RS)."""
    if "://" in text:
        require(
            text.strip().lower().startswith(("http://", "https://")),
            "destination",
            text.split("://")[0] + "://...",
            DESTINATION_FORMS,
        )
        return WebDestination(text.strip())
    return Destination.parse(text)


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """Optional TLS (PS3.15 B.1). Empty ``cert`` on the listening side: plain TCP.

    Attributes:
        cert, key: this node's PEM certificate and key, used when listening and as the
            client certificate when sending over TLS (``send`` on, or an https:// destination).
        ca: PEM bundle of trusted peers; empty means the system store (for the
            certificates of destinations and, with ``require_client_cert``, of callers).
        require_client_cert: refuse callers without a certificate signed by ``ca``.
        send: use TLS when sending results to every destination; required when the node
            listens with TLS, so that results never leave in cleartext (an http://
            destination must then be on loopback; https:// always uses TLS).
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False
    send: bool = False

    def __post_init__(self) -> None:
        require(
            bool(self.cert) == bool(self.key),
            "tls.cert and tls.key",
            (self.cert, self.key),
            "given together",
        )
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            require(
                not value or Path(value).is_file(), f"tls.{name}", value, "an existing PEM file"
            )

    @property
    def listening(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Delivery of results: one association per batch, exponential backoff, dead letters.

    Attributes:
        batch_size: most objects sent over one association.
        initial_backoff_s, max_backoff_s: wait after a failed attempt, doubling up to the cap.
        max_refusals: an object the destination refuses this many times goes to dead letters.
        dead_letter_after_s: an object still undelivered after this long goes to dead letters.
        max_request_mb: most megabytes in one STOW-RS request (an object larger goes alone).
        stall_after_s: ``/health`` says degraded when a destination's oldest result has
            waited this long, or every attempt to deliver to it has failed for this long.
        associations: most associations (connections, for a web destination) open to one
            destination at once, each sending its own batch: results keep pace with the
            worker while one is on a slow link or a slow store; one instance is never on two
            at once, so a correction still arrives after what it corrects.
    """

    batch_size: int = 32
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    max_refusals: int = 3
    dead_letter_after_s: float = 7 * 24 * 3600.0
    max_request_mb: int = 64
    stall_after_s: float = 600.0
    associations: int = 1

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "outbox.batch_size", self.batch_size, "at least 1")
        require(
            isinstance(self.associations, int) and 1 <= self.associations <= MAX_ASSOCIATIONS,
            "outbox.associations",
            self.associations,
            f"a whole number from 1 to {MAX_ASSOCIATIONS}",
        )
        require(
            self.max_request_mb >= 1, "outbox.max_request_mb", self.max_request_mb, "at least 1"
        )
        check_seconds("outbox.max_backoff_s", self.max_backoff_s)
        check_seconds("outbox.initial_backoff_s", self.initial_backoff_s)
        require(
            self.initial_backoff_s <= self.max_backoff_s,
            "outbox.initial_backoff_s",
            self.initial_backoff_s,
            "at most max_backoff_s",
        )
        require(self.max_refusals >= 1, "outbox.max_refusals", self.max_refusals, "at least 1")
        check_seconds("outbox.dead_letter_after_s", self.dead_letter_after_s, MAX_AGE_DAYS * 86400)
        check_seconds("outbox.stall_after_s", self.stall_after_s)


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """The scale-out mode: several nodes over one PostgreSQL database (docs/decisions.md,
    "Scale-out on PostgreSQL"). Empty ``database``: the embedded default, one node over its own
    spool.

    Attributes:
        database: a libpq connection string (``host=db.example port=5432 dbname=dp
            user=dpnode``); the password belongs in a password file (``passfile=...`` or
            ``~/.pgpass``), never in the configuration.
        node_name: this node's name in the audit trail and on its leases; empty: the host name.
        lease_s: how long an image taken by this node stays its own without a heartbeat: a
            node that dies loses its images to the others this long after its last heartbeat.
        take: most images taken from the shared queue at once (beyond what the worker
            is processing).
    """

    database: str = ""
    node_name: str = ""
    lease_s: float = 30.0
    take: int = 16

    def __post_init__(self) -> None:
        require(
            _SECRET_IN_DSN.search(self.database) is None,
            "scale.database",
            "(a string with a password)",
            "a connection string without its password (put it in a password file: passfile=... or ~/.pgpass)",
        )
        require(
            2.0 <= self.lease_s <= 3600.0, "scale.lease_s", self.lease_s, "from 2 to 3600 seconds"
        )
        require(1 <= self.take <= 256, "scale.take", self.take, "from 1 to 256")
        require(
            self.node_name == "" or OUTPUT_NAME.fullmatch(self.node_name) is not None,
            "scale.node_name",
            self.node_name,
            "lower-case letters, digits and hyphens (empty: the host name)",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.database)


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    """How long and how much of what got no result the node keeps for a person to look at.

    ``skipped_*`` applies to ``spool/skipped/``; ``failed_*`` to ``spool/failed/`` and to
    ``dead-letter/``. The oldest files go first; 0 means no limit.
    """

    skipped_days: float = 7.0
    skipped_max_mb: int = 1024
    failed_days: float = 30.0
    failed_max_mb: int = 4096

    def __post_init__(self) -> None:
        for name in ("skipped_max_mb", "failed_max_mb"):
            require(
                getattr(self, name) >= 0,
                f"retention.{name}",
                getattr(self, name),
                "0 (no limit) or more",
            )
        for name in ("skipped_days", "failed_days"):
            check_days(f"retention.{name}", getattr(self, name))


def _require_kinds(kinds: tuple[str, ...], key: str, empty: bool) -> None:
    """The shape of a list of output kinds; which kinds exist is the results registry's to say."""
    ok = (
        (empty or bool(kinds))
        and len(set(kinds)) == len(kinds)
        and all(isinstance(k, str) and OUTPUT_NAME.fullmatch(k) for k in kinds)
    )
    require(
        ok,
        key,
        list(kinds),
        # which names exist, the results registry says when the node starts (writers_for)
        ("" if empty else "one or more ") + "output kind names, each once",
    )


def _destination(index: int, item: str | WebDestination) -> Destination | WebDestination:
    if isinstance(item, WebDestination):
        return item
    try:
        return parse_destination(item)
    except ValueError as exc:
        raise ValueError(f"destinations[{index}]: {exc}") from None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"allow_networks must be addresses or networks such as 10.0.0.0/8, got {text!r}"
        ) from None


#: An output kind's name (the kinds themselves are data: :mod:`pacs_node.results.registry`).
OUTPUT_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
#: The overlay's Modality: the source's (CR or DX; viewers hang it beside the radiograph, and
#: OHIF opens a cine player on OT series), or OT, for routing rules that send every CR and DX on.
OVERLAY_MODALITIES = ("source", "OT")
#: The overlay's transfer syntax, both lossless (docs/decisions.md, "The overlay travels
#: uncompressed"): explicit (Explicit VR Little Endian: nothing to encode, for loopback and a
#: LAN) or jpeg-ls (JPEG-LS lossless: under a third of the bytes for 0.2 to 0.3 s of CPU per RG1 image, for
#: a destination behind a link slower than about 1 Gb/s).
OVERLAY_TRANSFER_SYNTAXES = ("explicit", "jpeg-ls")

#: A password written in a libpq connection string, as a keyword or in a URI's user part.
_SECRET_IN_DSN = re.compile(r"(^|\s)password\s*=|://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)

#: The largest data set the scale-out mode takes: a PostgreSQL value holds at most 1 GB.
MAX_SHARED_DATASET_MB = 1000

#: Who runs the model (dp_model.serving.runner.ENGINES, repeated here so that reading a configuration
#: does not import torch; tests/test_onnx_engine.py keeps the two equal).
ENGINES = ("auto", "torch", "onnx", "onnx-int8")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything ``dp-node`` needs; see ``configs/node.yaml`` for the documented defaults.

    Secure by default: the node listens on loopback, accepts only the calling AE titles in
    ``allow`` from the networks in ``allow_networks``, and an open node (any caller) needs
    ``allow_any_caller: true``, which it announces at start.
    """

    ae_title: str = "DPNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    bundle: str = ""
    spool: str = "runs/node/spool"
    output_dir: str = "runs/node/results"
    destinations: tuple[str | WebDestination, ...] = ()
    allow: tuple[str, ...] = ("STORESCU",)
    allow_any_caller: bool = False
    allow_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_associations: int = 16
    max_associations_per_host: int = 8
    # the maximum PDU length the node announces: senders cut each data set into PDUs of at
    # most this; pynetdicom's and dcmtk's 16 kB cost the node a Python round per 16 kB
    max_pdu_bytes: int = 2**20
    max_queue: int = 10000
    max_dataset_mb: int = 512
    min_free_mb: int = 256
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0  # an association with no DIMSE activity this long is aborted
    # the last slots: for addresses holding under half their per-host limit
    reserved_associations: int = 4
    # fewer free slots than reserved: associations idle this long are reclaimed
    reclaim_idle_s: float = 5.0
    # a PDU or DIMSE message under way must arrive at min_receive_kb_s ...
    receive_grace_s: float = 10.0
    min_receive_kb_s: float = 4.0  # ... after this grace (kB = 1000 bytes)
    http_timeout_s: float = 10.0  # an HTTP connection is closed this long after it opened
    http_max_connections: int = 16  # concurrent HTTP connections; beyond, 503 without a thread
    stall_after_s: float = 300.0
    device: str = "auto"
    # who runs the model: auto (ONNX Runtime on the CPU where the bundle has a graph), torch, onnx,
    # onnx-int8 (the graph's 8-bit copy, where the bundle kept one; never chosen by auto)
    engine: str = "auto"
    batch_size: int = 8
    # what the decoded images of one batch may hold; a larger image goes alone
    batch_memory_mb: int = 256
    operating_point: float | None = None  # None: the bundle's "present" point
    ood_gate: bool = True  # False: every image is assessed, however unlike the training images
    heatmap_stage: int = 3
    # output kinds (pacs_node.results.registry): sr, sc, gsps (a presentation state with the
    # regions), fhir (the worklist message, for a destination with protocol fhir)
    outputs: tuple[str, ...] = ("sr", "sc")
    overlay_max_side: int = 2048
    overlay_modality: str = "source"  # "source": the radiograph's CR or DX; "OT": Other
    overlay_transfer_syntax: str = "explicit"  # or "jpeg-ls": lossless, a third of the bytes
    keep_skipped: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8089
    # the recent window of /metrics' rates and drift distance, in images processed (pacs_node.drift)
    drift_window: int = 200
    audit_log: str = ""
    tls: TLSConfig = field(default_factory=TLSConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self) -> None:
        check_ae_title("ae_title", self.ae_title)
        for title in self.allow:
            check_ae_title("allow", title)
        require(
            bool(self.allow) or self.allow_any_caller,
            "allow",
            list(self.allow),
            "the calling AE titles that may send (or set allow_any_caller: true for an open node)",
        )
        require(
            bool(self.allow_networks),
            "allow_networks",
            list(self.allow_networks),
            "the networks callers may come from (0.0.0.0/0 and ::/0 for any)",
        )
        self.networks()
        require(0 <= self.port < 65536, "port", self.port, "from 0 (any free port) to 65535")
        require(
            -1 <= self.metrics_port < 65536,
            "metrics_port",
            self.metrics_port,
            "-1 (off), 0 (any free port) or a port",
        )
        require(self.drift_window >= 10, "drift_window", self.drift_window, "at least 10 images")
        require(self.max_associations >= 1, "max_associations", self.max_associations, "at least 1")
        require(
            self.max_associations_per_host >= 1,
            "max_associations_per_host",
            self.max_associations_per_host,
            "at least 1",
        )
        require(
            4096 <= self.max_pdu_bytes <= MAX_PDU_BYTES,
            "max_pdu_bytes",
            self.max_pdu_bytes,
            f"from 4096 to {MAX_PDU_BYTES} (4 MB)",
        )
        require(self.max_queue >= 1, "max_queue", self.max_queue, "at least 1")
        require(self.max_dataset_mb >= 1, "max_dataset_mb", self.max_dataset_mb, "at least 1")
        require(self.min_free_mb >= 0, "min_free_mb", self.min_free_mb, "0 or more")
        require(
            not self.scale.enabled or self.max_dataset_mb <= MAX_SHARED_DATASET_MB,
            "max_dataset_mb",
            self.max_dataset_mb,
            f"at most {MAX_SHARED_DATASET_MB} in the scale-out mode (PostgreSQL keeps a value of at most 1 GB)",
        )
        check_seconds("stall_after_s", self.stall_after_s)
        require(
            not (self.tls.listening and self.destinations and not self.tls.send),
            "tls.send",
            self.tls.send,
            "true when the node listens with TLS (results would leave in cleartext)",
        )
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            self.device,
            "auto, cpu or cuda[:N]",
        )
        require(self.engine in ENGINES, "engine", self.engine, ", ".join(ENGINES))
        # the 8-bit graph was compared with the float graph at the bundle's own points, its gate on
        require(
            self.engine != "onnx-int8" or (self.operating_point is None and self.ood_gate),
            "engine",
            self.engine,
            "onnx-int8 only at the bundle's own operating point with the out-of-distribution gate on "
            "(the decisions it was validated on)",
        )
        require(1 <= self.batch_size <= 256, "batch_size", self.batch_size, "from 1 to 256")
        require(self.batch_memory_mb >= 1, "batch_memory_mb", self.batch_memory_mb, "at least 1")
        require(
            self.operating_point is None or 0.0 < self.operating_point < 1.0,
            "operating_point",
            self.operating_point,
            "between 0 and 1, or empty",
        )
        require(
            self.heatmap_stage in (1, 2, 3, 4), "heatmap_stage", self.heatmap_stage, "1, 2, 3 or 4"
        )
        _require_kinds(self.outputs, "outputs", empty=False)
        require(
            self.overlay_modality in OVERLAY_MODALITIES,
            "overlay_modality",
            self.overlay_modality,
            " or ".join(OVERLAY_MODALITIES),
        )
        require(
            self.overlay_transfer_syntax in OVERLAY_TRANSFER_SYNTAXES,
            "overlay_transfer_syntax",
            self.overlay_transfer_syntax,
            " or ".join(OVERLAY_TRANSFER_SYNTAXES),
        )
        require(
            256 <= self.overlay_max_side <= MAX_IMAGE_SIDE,
            "overlay_max_side",
            self.overlay_max_side,
            f"from 256 to {MAX_IMAGE_SIDE}",
        )
        for timeout in (
            "acse_timeout_s",
            "dimse_timeout_s",
            "network_timeout_s",
            "handshake_timeout_s",
        ):
            check_seconds(timeout, getattr(self, timeout))
        self._check_slots()
        self.parsed_destinations()

    def _check_slots(self) -> None:
        """The keys that keep idle, trickling and crowding peers from holding the node's slots and threads."""
        for name in ("idle_timeout_s", "reclaim_idle_s", "receive_grace_s", "http_timeout_s"):
            check_seconds(name, getattr(self, name))
        require(
            _finite(self.min_receive_kb_s) and 0 < self.min_receive_kb_s <= 1e6,
            "min_receive_kb_s",
            self.min_receive_kb_s,
            "above 0 and at most 1e+06 kB/s",
        )
        require(
            self.reserved_associations >= 0,
            "reserved_associations",
            self.reserved_associations,
            "0 or more",
        )
        require(
            self.http_max_connections >= 1,
            "http_max_connections",
            self.http_max_connections,
            "at least 1",
        )

    @property
    def reserved_slots(self) -> int:
        """``reserved_associations``, at most half of ``max_associations`` (a small node reserves less)."""
        return min(self.reserved_associations, self.max_associations // 2)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``allow_networks`` parsed."""
        return [_network(text) for text in self.allow_networks]

    @property
    def max_dataset_bytes(self) -> int:
        return self.max_dataset_mb * 2**20

    def parsed_destinations(self) -> list[Destination | WebDestination]:
        parsed = [_destination(index, item) for index, item in enumerate(self.destinations)]
        names = [d.name for d in parsed]
        require(len(set(names)) == len(names), "destinations", [str(d) for d in parsed], "distinct")
        for index, destination in enumerate(parsed):
            cleartext = isinstance(destination, WebDestination) and destination.cleartext
            require(
                not (cleartext and self.tls.send),
                f"destinations[{index}]",
                str(destination),
                "https:// when tls.send is true (results would leave in cleartext)",
            )
        return parsed

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_log) if self.audit_log else Path(self.spool) / "audit.jsonl"
