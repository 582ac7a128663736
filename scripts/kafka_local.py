"""A local single-node Apache Kafka broker (KRaft: broker + controller in one JVM) for development and tests.

The broker jars come from Maven Central (fetched once with Maven into a cache outside the repository,
`~/.cache/tollgate/kafka-<version>` unless TOLLGATE_KAFKA_CACHE says otherwise). Everything the broker
writes lives in one directory: its config, its data, its log and its pid file, so a restart on the same
directory keeps the data and the address.

    scripts/kafka-local fetch
    scripts/kafka-local start --dir DIR [--port N]   # prints the bootstrap address, e.g. 127.0.0.1:40123
    scripts/kafka-local stop --dir DIR               # SIGTERM, then SIGKILL after stop_timeout_s
    scripts/kafka-local kill --dir DIR               # SIGKILL: simulates a crash of the broker
    scripts/kafka-local status --dir DIR

Standard library only, so it runs with any Python 3.11 (the tests import it as `scripts.kafka_local`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "3.9.2"  # aiokafka 0.14 and faust-streaming 0.15 speak every API this broker needs
SCALA_VERSION = "2.13"
SLF4J_RELOAD4J_VERSION = "1.7.36"  # Kafka 3.9 logs through slf4j 1.7 onto reload4j (log4j 1 API)

HEAP_MAX_MB = 512
HEAP_INITIAL_MB = 128
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
KILL_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.1
MAVEN_TIMEOUT_S = 600.0

CONFIG_FILE = "server.properties"
LOG4J_FILE = "log4j.properties"
DATA_DIR = "data"
PID_FILE = "broker.pid"
WATCHER_PID_FILE = "watcher.pid"
WATCH_INTERVAL_S = 1.0
LOG_FILE = "broker.log"
BOOTSTRAP_FILE = "bootstrap"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"

METADATA_API_KEY = 3
METADATA_API_VERSION = 4  # supported by every broker from 1.0 through 4.x
CLIENT_ID = b"kafka-local-probe"


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started, probed or stopped; the message says why."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


# ---------------------------------------------------------------------------------------------- fetching


def cache_dir() -> Path:
    configured = os.environ.get("TOLLGATE_KAFKA_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tollgate" / f"kafka-{KAFKA_VERSION}"


def _pom_xml() -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tollgate</groupId>
  <artifactId>kafka-local</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>{SLF4J_RELOAD4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""


def fetch_jars() -> Path:
    """Download the broker and its runtime dependencies once; return the folder holding the jars."""
    libs = cache_dir() / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    maven = shutil.which("mvn")
    if maven is None:
        raise BrokerError("Maven (mvn) is not on PATH: it is needed once to fetch the Kafka jars")
    cache_dir().mkdir(parents=True, exist_ok=True)
    pom = cache_dir() / "pom.xml"
    pom.write_text(_pom_xml())
    staging = cache_dir() / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        maven,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S)
    if result.returncode != 0:
        raise BrokerError(f"mvn could not fetch Kafka {KAFKA_VERSION}:\n{result.stdout}\n{result.stderr}")
    if not list(staging.glob(f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar")):
        raise BrokerError(f"mvn finished but {staging} holds no kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.write_text(KAFKA_VERSION + "\n")
    return libs


# ---------------------------------------------------------------------------------------------- config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_properties(directory: Path, address: BrokerAddress) -> str:
    data = directory / DATA_DIR
    return f"""# Written by scripts/kafka_local.py: one node that is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{address.host}:{address.controller_port}
listeners=PLAINTEXT://{address.host}:{address.port},CONTROLLER://{address.host}:{address.controller_port}
advertised.listeners=PLAINTEXT://{address.host}:{address.port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# After a crash the old registration blocks the restarted broker until its session expires (default 9 s).
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
log.segment.bytes=16777216
log.retention.check.interval.ms=60000
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=8388608
socket.request.max.bytes=33554432
"""


_LOG4J_PROPERTIES = """log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


def _read_address(directory: Path) -> BrokerAddress | None:
    config = directory / CONFIG_FILE
    if not config.exists():
        return None
    values = dict(
        line.split("=", 1)
        for line in config.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    host, port = values["advertised.listeners"].removeprefix("PLAINTEXT://").rsplit(":", 1)
    controller_port = values["controller.quorum.voters"].rsplit(":", 1)[1]
    return BrokerAddress(host=host, port=int(port), controller_port=int(controller_port))


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        encoded = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not encoded.startswith("-"):
            return encoded


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if java is None:
        raise BrokerError("no java on PATH (and JAVA_HOME is not set): Kafka needs Java 17 or later")
    return java


def _java_command(libs: Path, directory: Path, main_class: str, *arguments: str) -> list[str]:
    return [
        _java(),
        f"-Xmx{HEAP_MAX_MB}m",
        f"-Xms{HEAP_INITIAL_MB}m",
        "-XX:+UseSerialGC",  # one GC thread: the box has two cores and the broker is small
        "-XX:TieredStopAtLevel=1",  # C1 only: starts faster, ample for test traffic
        "-Xss512k",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{directory / LOG4J_FILE}",
        f"-Dkafka.logs.dir={directory}",
        "-cp",
        f"{libs}/*",
        main_class,
        *arguments,
    ]


def _format_storage(libs: Path, directory: Path) -> None:
    if (directory / DATA_DIR / "meta.properties").exists():
        return
    command = _java_command(
        libs,
        directory,
        STORAGE_TOOL_CLASS,
        "format",
        "--ignore-formatted",
        "-t",
        _cluster_id(),
        "-c",
        str(directory / CONFIG_FILE),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if result.returncode != 0:
        raise BrokerError(f"kafka storage format failed in {directory}:\n{result.stdout}\n{result.stderr}")


# ---------------------------------------------------------------------------------------------- probing


def _encode_string(text: bytes) -> bytes:
    return struct.pack(">h", len(text)) + text


def _metadata_request(correlation_id: int) -> bytes:
    header = struct.pack(">hhi", METADATA_API_KEY, METADATA_API_VERSION, correlation_id) + _encode_string(
        CLIENT_ID
    )
    body = struct.pack(">i", -1) + struct.pack(">?", False)  # all topics, no auto-creation
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        chunks.extend(chunk)
    return bytes(chunks)


def probe_metadata(address: BrokerAddress, timeout_s: float = PROBE_TIMEOUT_S) -> list[tuple[int, str, int]]:
    """Send a real Metadata request; return the brokers it lists as (node id, host, port).

    Raises OSError while the broker does not answer.
    """
    correlation_id = 7
    with socket.create_connection((address.host, address.port), timeout=timeout_s) as connection:
        connection.sendall(_metadata_request(correlation_id))
        (size,) = struct.unpack(">i", _receive_exactly(connection, 4))
        response = _receive_exactly(connection, size)
    (answered_id, _throttle_ms, broker_count) = struct.unpack_from(">iii", response, 0)
    if answered_id != correlation_id:
        raise ConnectionError(
            f"metadata response for correlation id {answered_id}, expected {correlation_id}"
        )
    brokers = []
    offset = 12
    for _ in range(broker_count):
        node_id, host_length = struct.unpack_from(">ih", response, offset)
        offset += 6
        host = response[offset : offset + host_length].decode()
        offset += host_length
        (port, rack_length) = struct.unpack_from(">ih", response, offset)
        offset += 6 + max(rack_length, 0)
        brokers.append((node_id, host, port))
    return brokers


# ---------------------------------------------------------------------------------------------- processes


def _read_pid(directory: Path) -> int | None:
    pid_file = directory / PID_FILE
    if not pid_file.exists():
        return None
    return int(pid_file.read_text().strip())


def _is_our_broker(pid: int, directory: Path) -> bool:
    """True while `pid` is a live (not zombie) JVM running this directory's broker."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it and it has exited
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = status.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        return False
    expected_config = str(directory / CONFIG_FILE).encode()
    return MAIN_CLASS.encode() in command_line and expected_config in command_line


def running_pid(directory: Path) -> int | None:
    directory = Path(directory).resolve()
    pid = _read_pid(directory)
    if pid is not None and _is_our_broker(pid, directory):
        return pid
    return None


def _wait_until_gone(pid: int, directory: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _is_our_broker(pid, directory):
            return True
        time.sleep(POLL_INTERVAL_S)
    return not _is_our_broker(pid, directory)


def _log_tail(directory: Path, lines: int = 40) -> str:
    log = directory / LOG_FILE
    if not log.exists():
        return "(no broker log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_serving(
    process: subprocess.Popen, address: BrokerAddress, directory: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerError(
                f"broker exited with {process.returncode} while starting:\n{_log_tail(directory)}"
            )
        try:
            brokers = probe_metadata(address)
        except (OSError, struct.error) as error:
            last_error = error
        else:
            if (address.host, address.port) in {(host, port) for _, host, port in brokers}:
                return
            last_error = ConnectionError(f"metadata lists brokers {brokers}, not yet {address.bootstrap}")
        time.sleep(POLL_INTERVAL_S)
    raise BrokerError(
        f"broker did not answer metadata within {timeout_s}s ({last_error}):\n{_log_tail(directory)}"
    )


def start(
    directory: Path, port: int | None = None, timeout_s: float = START_TIMEOUT_S, owner_pid: int | None = None
) -> BrokerAddress:
    """Start (or restart, keeping the data) the broker that lives in `directory`; return its address.

    With `owner_pid`, a small watcher process kills the broker once that process is gone, so a test run
    that dies without its teardown does not leave a JVM behind.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if owner_pid is not None:
        _ensure_watcher(directory, owner_pid)
    existing = _read_address(directory)
    if running_pid(directory) is not None:
        assert existing is not None, f"a broker runs from {directory} but its config is gone"
        return existing
    libs = fetch_jars()
    if existing is None or (port is not None and port != existing.port):
        address = BrokerAddress(
            host="127.0.0.1",
            port=port if port is not None else _free_port(),
            controller_port=existing.controller_port if existing else _free_port(),
        )
        (directory / CONFIG_FILE).write_text(_server_properties(directory, address))
    else:
        address = existing
    (directory / LOG4J_FILE).write_text(_LOG4J_PROPERTIES)
    _format_storage(libs, directory)
    command = _java_command(libs, directory, MAIN_CLASS, str(directory / CONFIG_FILE))
    with open(directory / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (directory / PID_FILE).write_text(f"{process.pid}\n")
    (directory / BOOTSTRAP_FILE).write_text(address.bootstrap + "\n")
    try:
        _wait_until_serving(process, address, directory, timeout_s)
    except BrokerError:
        kill(directory)
        raise
    return address


def _ensure_watcher(directory: Path, owner_pid: int) -> None:
    watcher_pid_file = directory / WATCHER_PID_FILE
    if watcher_pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(watcher_pid_file.read_text().strip()), 0)
            return  # one watcher per directory; it outlives restarts of the broker
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "watch",
        "--dir",
        str(directory),
        "--owner-pid",
        str(owner_pid),
    ]
    watcher = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    watcher_pid_file.write_text(f"{watcher.pid}\n")


def watch(directory: Path, owner_pid: int) -> None:
    """Block until `owner_pid` is gone, then SIGKILL the broker of `directory` if it still runs."""
    directory = Path(directory).resolve()
    while True:
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(WATCH_INTERVAL_S)
    kill(directory)
    (directory / WATCHER_PID_FILE).unlink(missing_ok=True)


def _signal_group(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal_number)  # the broker leads its own process group (start_new_session)


def stop(directory: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the broker cleanly: SIGTERM, then SIGKILL after `timeout_s`. Returns False if none was running."""
    directory = Path(directory).resolve()
    pid = running_pid(directory)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_until_gone(pid, directory, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        if not _wait_until_gone(pid, directory, KILL_TIMEOUT_S):
            raise BrokerError(f"broker pid {pid} survived SIGKILL for {KILL_TIMEOUT_S}s")
    (directory / PID_FILE).unlink(missing_ok=True)
    return True


def kill(directory: Path) -> bool:
    """SIGKILL the broker (a crash: no clean shutdown). Returns False if none was running."""
    directory = Path(directory).resolve()
    pid = running_pid(directory)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGKILL)
    if not _wait_until_gone(pid, directory, KILL_TIMEOUT_S):
        raise BrokerError(f"broker pid {pid} survived SIGKILL for {KILL_TIMEOUT_S}s")
    (directory / PID_FILE).unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kafka-local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="download the broker jars into the cache (once)")
    start_parser = commands.add_parser("start", help="start the broker in DIR; prints the bootstrap address")
    start_parser.add_argument("--dir", required=True, type=Path)
    start_parser.add_argument("--port", type=int, default=None, help="PLAINTEXT port (default: a free one)")
    start_parser.add_argument("--timeout-s", type=float, default=START_TIMEOUT_S)
    stop_parser = commands.add_parser("stop", help="SIGTERM the broker in DIR, SIGKILL after --timeout-s")
    stop_parser.add_argument("--dir", required=True, type=Path)
    stop_parser.add_argument("--timeout-s", type=float, default=STOP_TIMEOUT_S)
    kill_parser = commands.add_parser("kill", help="SIGKILL the broker in DIR (simulated crash)")
    kill_parser.add_argument("--dir", required=True, type=Path)
    watch_parser = commands.add_parser("watch", help="kill the broker in DIR once --owner-pid exits")
    watch_parser.add_argument("--dir", required=True, type=Path)
    watch_parser.add_argument("--owner-pid", required=True, type=int)
    status_parser = commands.add_parser(
        "status", help="print the bootstrap address if running; exit 1 if not"
    )
    status_parser.add_argument("--dir", required=True, type=Path)
    arguments = parser.parse_args(argv)

    try:
        if arguments.command == "fetch":
            print(fetch_jars())
        elif arguments.command == "start":
            started_at = time.monotonic()
            address = start(arguments.dir, arguments.port, arguments.timeout_s)
            print(address.bootstrap)
            print(f"broker serving in {time.monotonic() - started_at:.2f}s", file=sys.stderr)
        elif arguments.command == "stop":
            if not stop(arguments.dir, arguments.timeout_s):
                print(f"no broker running in {arguments.dir}", file=sys.stderr)
        elif arguments.command == "kill":
            if not kill(arguments.dir):
                print(f"no broker running in {arguments.dir}", file=sys.stderr)
        elif arguments.command == "watch":
            watch(arguments.dir, arguments.owner_pid)
        elif arguments.command == "status":
            address = _read_address(Path(arguments.dir).resolve())
            if running_pid(arguments.dir) is None or address is None:
                print(f"no broker running in {arguments.dir}", file=sys.stderr)
                return 1
            print(address.bootstrap)
    except BrokerError as error:
        print(f"kafka-local: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
