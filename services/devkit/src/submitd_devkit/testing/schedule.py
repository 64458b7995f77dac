"""``make test``'s ``-n 6 --dist load``, with the tests of a module that share a module-scoped
fixture (a stack, a slapd, a PostgreSQL, an OpenID provider) sent to one worker together.

Under plain ``load`` they went out in chunks, and each worker that got some of them started that
fixture itself: a run started the module stacks some 25 times for 12 modules, the slapd and the
OpenID provider 5 times each. xdist's ``loadgroup`` would keep marked tests together, but it
renames node ids, which pytest 9 no longer allows. Here each worker writes, at collection, which
tests go together (their module's path), and the controller's scheduler (xdist's loadscope
scheduler, a scope per test otherwise) hands out each such group as one unit, in the order the
plugin sorted the tests into (the long ones first). ``SUBMITD_TEST_GROUPS=0`` turns this off."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

OPTION = "submitd_groups"


def enabled(config: pytest.Config) -> bool:
    return os.environ.get("SUBMITD_TEST_GROUPS", "1") != "0" and config.pluginmanager.hasplugin("xdist")


def group_of(item: pytest.Item) -> str | None:
    """The module's path, for a test that uses a module-scoped fixture; else None."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in item.fixturenames:
        defs = info.name2fixturedefs.get(name)
        if defs and defs[-1].scope == "module":
            return item.nodeid.split("::", 1)[0]
    return None


def write_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker: {node id: group} for the controller's scheduler."""
    directory = getattr(config, "workerinput", {}).get(OPTION)
    if directory:
        groups = {item.nodeid: group for item in items if (group := group_of(item))}
        path = Path(directory) / f"{config.workerinput['workerid']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(groups))
        path.with_suffix(".tmp").replace(path)


class Plugin:
    """Registered in the controller of an xdist run."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="submitd-test-groups-")

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        node.workerinput[OPTION] = self.directory

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getvalue("dist") != "load":
            return None
        from xdist.scheduler import LoadScopeScheduling

        directory = self.directory

        class GroupedLoadScheduling(LoadScopeScheduling):
            def __init__(self, config: pytest.Config, log=None) -> None:
                super().__init__(config, log)
                config.option.loadscopereorder = False  # the plugin's order: the long tests first
                self.groups: dict[str, str] | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self.groups is None:  # (asked once every worker has collected)
                    written = sorted(Path(directory).glob("*.json"))
                    self.groups = json.loads(written[0].read_text()) if written else {}
                return self.groups.get(nodeid, nodeid)

        return GroupedLoadScheduling(config, log)

    def pytest_unconfigure(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def configure(config: pytest.Config) -> None:
    if enabled(config) and not hasattr(config, "workerinput") and config.getvalue("numprocesses"):
        config.pluginmanager.register(Plugin(), "submitd-test-groups")
