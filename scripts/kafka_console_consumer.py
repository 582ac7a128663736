"""The broker's own `kafka-console-consumer` (org.apache.kafka.tools.consumer.ConsoleConsumer, what
bin/kafka-console-consumer.sh runs), next to the local broker of scripts/kafka_local.py.

    scripts/kafka-console-consumer --bootstrap-server 127.0.0.1:9092 --topic ledger.entries --from-beginning

The broker's jars (scripts/kafka-local fetch) plus the kafka-tools jar of the same version, fetched once
with Maven into the same cache. Every argument goes to the console consumer. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.kafka_local import KAFKA_VERSION, BrokerError, _java, cache_dir, fetch_jars  # noqa: E402

MAIN_CLASS = "org.apache.kafka.tools.consumer.ConsoleConsumer"
TOOLS_ARTIFACT = f"org.apache.kafka:kafka-tools:{KAFKA_VERSION}"
LOG4J_PROPERTIES = """log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
"""  # only warnings, on stderr: stdout carries the records


def fetch_tools() -> Path:
    """The kafka-tools jar, fetched once; returns its folder."""
    tools = cache_dir() / "tools"
    jar = tools / f"kafka-tools-{KAFKA_VERSION}.jar"
    if jar.exists():
        return tools
    maven = shutil.which("mvn")
    if maven is None:
        raise BrokerError("Maven (mvn) is not on PATH: it is needed once to fetch the Kafka tools jar")
    command = [
        maven,
        "-q",
        "-B",
        "dependency:copy",
        f"-Dartifact={TOOLS_ARTIFACT}",
        f"-DoutputDirectory={tools}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not jar.exists():
        raise BrokerError(f"fetching {TOOLS_ARTIFACT} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return tools


def command(arguments: list[str]) -> list[str]:
    libs, tools = fetch_jars(), fetch_tools()
    log4j = cache_dir() / "console-log4j.properties"
    if not log4j.exists():
        log4j.write_text(LOG4J_PROPERTIES)
    return [
        _java(),
        "-Xmx256m",
        "-XX:TieredStopAtLevel=1",
        f"-Dlog4j.configuration=file:{log4j}",
        "-cp",
        f"{libs}/*{os.pathsep}{tools}/*",
        MAIN_CLASS,
        *arguments,
    ]


def main(argv: list[str]) -> int:
    try:
        return subprocess.call(command(argv))
    except BrokerError as error:
        print(f"kafka-console-consumer: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
