"""The shipped log4j2.xml keeps a server's logs bounded however long it runs: every file appender rolls over at a size
and keeps a fixed number of old files, and the console (which scripts/server.py captures in logs/console.log, a file
nothing rolls over) gets warnings and errors only. A static read of the XML; the checker is shown to catch the
configurations it must refuse."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from yolonas_tools.serve.server import LOG_CONFIG

UNITS = {"": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
#  What one log may hold, current file and rolled-over copies together: docs/operations.md says every TorchServe log
#  rolls over at 10 MB and keeps 5 compressed files.
ROLL_AT, KEEP = "10 MB", 5
MAX_BYTES_PER_LOG = (KEEP + 1) * 10 * 1024**2
ROLLING = {"RollingFile", "RollingRandomAccessFile"}
SAFE_OTHERS = {"Console"}  # checked below: warnings and errors only


def resolve(value: str, properties: dict[str, str]) -> str:
    """``${name}`` from the Properties section; ``${env:NAME:-default}`` as its default (no environment here)."""
    value = re.sub(r"\$\{env:[^:}]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{(\w+)\}", lambda m: properties[m.group(1)], value)


def size_in_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"\s*(\d+)\s*([KMG]?B?)\s*", text, flags=re.I).groups()
    return int(number) * UNITS[unit.upper() if unit.upper() != "B" else ""]


def unbounded_appenders(xml: str) -> list[str]:
    """One line per appender that lets a log grow without bound (empty when every one is capped)."""
    root = ET.fromstring(xml)
    properties = {p.get("name"): p.text or "" for p in root.iter("Property")}
    problems = []
    for appender in root.find("Appenders"):
        name = f"{appender.tag} {appender.get('name')!r}"
        if appender.tag in SAFE_OTHERS:
            threshold = appender.find("ThresholdFilter")
            if threshold is None or threshold.get("level", "").upper() not in ("WARN", "ERROR", "FATAL"):
                problems.append(f"{name}: takes every level (it lands in logs/console.log, which nothing rolls over)")
            continue
        if appender.tag not in ROLLING:
            problems.append(f"{name}: never rolls over")
            continue
        trigger = next(appender.iter("SizeBasedTriggeringPolicy"), None)
        strategy = next(appender.iter("DefaultRolloverStrategy"), None)
        if trigger is None or strategy is None or strategy.get("max") is None:
            problems.append(f"{name}: needs a SizeBasedTriggeringPolicy and a DefaultRolloverStrategy with max")
            continue
        if "%i" not in appender.get("filePattern", ""):
            problems.append(f"{name}: its filePattern has no %i, so max cannot bound the rolled-over files")
            continue
        size = size_in_bytes(resolve(trigger.get("size"), properties))
        keep = int(resolve(strategy.get("max"), properties))
        if size * (keep + 1) > MAX_BYTES_PER_LOG:
            problems.append(f"{name}: holds up to {size * (keep + 1)} bytes, over {MAX_BYTES_PER_LOG}")
    return problems


def test_every_shipped_appender_is_bounded_as_documented():
    xml = LOG_CONFIG.read_text()
    assert unbounded_appenders(xml) == []
    root = ET.fromstring(xml)
    properties = {p.get("name"): p.text or "" for p in root.iter("Property")}
    for appender in root.find("Appenders"):
        if appender.tag in ROLLING:
            rolls_at = resolve(next(appender.iter("SizeBasedTriggeringPolicy")).get("size"), properties)
            keeps = resolve(next(appender.iter("DefaultRolloverStrategy")).get("max"), properties)
            assert (rolls_at, int(keeps)) == (ROLL_AT, KEEP) and appender.get("filePattern").endswith(".gz")
    appenders = {a.get("name") for a in root.find("Appenders")}
    assert {"access_log", "model_log", "model_metrics", "ts_log", "ts_metrics"} <= appenders  # TorchServe's five
    referenced = {ref.get("ref") for ref in root.iter("AppenderRef")}
    assert referenced == appenders, "every logger writes to a declared appender, and every appender is used"


GOOD = """<Configuration><Properties><Property name="size">10 MB</Property></Properties><Appenders>
  <Console name="STDOUT"><ThresholdFilter level="WARN"/></Console>
  <RollingFile name="log" fileName="logs/a.log" filePattern="logs/a.%i.log.gz">
    <SizeBasedTriggeringPolicy size="${size}"/><DefaultRolloverStrategy max="5"/></RollingFile>
</Appenders></Configuration>"""


@pytest.mark.parametrize("broken, problem", [
    (GOOD.replace('<ThresholdFilter level="WARN"/>', ""), "Console 'STDOUT': takes every level"),
    (GOOD.replace("</Appenders>", '<File name="plain" fileName="logs/p.log"/></Appenders>'),
     "File 'plain': never rolls over"),
    (GOOD.replace('<DefaultRolloverStrategy max="5"/>', "<DefaultRolloverStrategy/>"),
     "RollingFile 'log': needs a SizeBasedTriggeringPolicy and a DefaultRolloverStrategy with max"),
    (GOOD.replace('<SizeBasedTriggeringPolicy size="${size}"/>', '<TimeBasedTriggeringPolicy/>'),
     "RollingFile 'log': needs a SizeBasedTriggeringPolicy"),
    (GOOD.replace("a.%i.log.gz", "a.%d{yyyy-MM-dd}.log.gz"), "RollingFile 'log': its filePattern has no %i"),
    (GOOD.replace('max="5"', 'max="9"'), "RollingFile 'log': holds up to 104857600 bytes, over 62914560"),
])  # fmt: skip
def test_the_check_refuses_an_unbounded_appender(broken: str, problem: str):
    assert unbounded_appenders(GOOD) == []
    (found,) = unbounded_appenders(broken)
    assert found.startswith(problem), found
