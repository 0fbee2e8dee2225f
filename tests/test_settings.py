"""Configuration: file + environment, and errors that name the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import FiledockTree, command_route

from service.errors import ConfigError
from service.settings import Settings, load_settings


def _share(**options: object) -> dict[str, object]:
    return {"name": "share", "kind": "directory", "path": "/mnt/share", **options}


def _s3(**keys: object) -> dict[str, object]:
    return {"name": "s", "kind": "s3", "bucket": "bkt", **keys}


def _web(url: str, **options: object) -> dict[str, object]:
    return {"name": "web", "kind": "http", "url": url, **options}


def _write(path: Path, doc: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(
        tmp_path / "c.yaml", {"root": "/srv/x", "http": {"port": 9200}, "routes": [command_route()]}
    )
    monkeypatch.setenv("FILEDOCK_HTTP__PORT", "9300")
    monkeypatch.setenv("FILEDOCK_MAX_CONCURRENCY", "3")
    s = load_settings(cfg)
    assert s.http.port == 9300 and s.max_concurrency == 3 and s.root == Path("/srv/x")
    assert s.folder("proc") == Path("/srv/x/proc")
    assert s.effective_ledger_url == "sqlite:////srv/x/state/ledger.sqlite3"


def test_toml_works_too(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'root = "/d"\n[[routes]]\nname = "a"\nmatch = "*.csv"\n'
        '[routes.importer]\nkind = "python"\ncallable = "m:f"\n'
    )
    assert load_settings(cfg).routes[0].name == "a"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"rooot": "/x"}, "rooot: unknown setting"),
        ({"max_concurrency": 0}, "max_concurrency: Input should be greater than or equal to 1"),
        ({"retention": {"archive_days": 3}}, "retention.archive_days"),
        (
            {"routes": [{"name": "a", "match": "*", "importer": {"kind": "ftp"}}]},
            "routes.0.importer",
        ),
        (
            {"routes": [command_route(order="partition")]},
            "order: partition needs partition_key",
        ),
        (
            {"routes": [command_route(partition_key="(?P<nokey>x)")]},
            "named group (?P<key>...)",
        ),
        ({"routes": [command_route(match="../etc/*")]}, "without / or .."),
        ({"routes": [command_route(), command_route()]}, "is used twice"),
        (
            {"routes": [command_route(deliver=[_share(), _share()])]},
            "two sinks are named 'share'",
        ),
        (
            {"routes": [command_route(deliver=[_share(target="{customer}/{name}")])]},
            "unknown field {customer}",
        ),
        (
            {"routes": [command_route(deliver=[_share(target="/abs/{name}")])]},
            "is absolute",
        ),
        (
            {"routes": [command_route(deliver=[_share(path="relative/dir")])]},
            "path must be absolute",
        ),
        (
            {"routes": [command_route(importer="none", deliver=[_share(send="outputs")])]},
            "importer: none makes none",
        ),
        (
            {"routes": [command_route(deliver=[_web("https://{route}.example/x")])]},
            "fields go in its path",
        ),
        (
            {"routes": [command_route(deliver=[_web("https://h.example/in?x={name}")])]},
            "no query or fragment",
        ),
        (
            {"routes": [command_route(deliver=[_web("https://h.example")])]},
            "needs a path after the host",
        ),
        (
            {"routes": [command_route(deliver=[_web("https://h/{name}", retry_statuses=[503])])]},
            "retry_statuses lists 4xx codes",
        ),
        ({"routes": [command_route(deliver=[_s3(key="{x}")])]}, "unknown field {x}"),
        (
            {"routes": [command_route(deliver=[_s3(secret_access_key={"env": "A", "file": "/"})])]},
            "exactly one of env or file",
        ),
        (
            {"routes": [command_route(deliver=[_s3(head_first=False, conditional_writes=False)])]},
            "head_first: false needs conditional_writes: true",
        ),
    ],
)
def test_bad_configuration_names_field_and_reason(
    tmp_path: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path / "c.yaml", doc))
    assert message in str(e.value)


def test_check_config_exit_codes_and_output(tree: FiledockTree) -> None:
    tree.configure()
    ok = tree.cli("check-config")
    assert ok.returncode == 0, ok.stderr
    effective = yaml.safe_load(ok.stdout)
    assert effective["folders"]["proc"] == str(tree.root / "proc")
    assert effective["routes"][0]["max_attempts"] == 3
    assert effective["watch_mode"] == "auto"

    tree.config.write_text(tree.config.read_text() + "typo_here: 1\n")
    bad = tree.cli("check-config")
    assert bad.returncode == 2
    assert "typo_here: unknown setting" in bad.stderr
    run = tree.run_once()
    assert run.returncode == 2 and "typo_here" in run.stderr


def test_unreachable_route_and_missing_callable_are_errors(tree: FiledockTree) -> None:
    tree.configure(
        [
            command_route("everything", match="**"),
            command_route("orders", match="orders/*.csv"),
        ]
    )
    r = tree.cli("check-config")
    assert r.returncode == 2 and "routes.orders: unreachable" in r.stderr
    tree.configure(
        [{"name": "p", "match": "*", "importer": {"kind": "python", "callable": "nope.mod:f"}}]
    )
    r = tree.cli("check-config")
    assert r.returncode == 2 and "cannot import 'nope.mod'" in r.stderr


def test_missing_config_file_is_a_clear_error(tree: FiledockTree) -> None:
    tree.config = tree.base / "absent.yaml"
    r = tree.cli("check-config")
    assert r.returncode == 2 and "cannot read configuration file" in r.stderr


def test_sinks_read_their_defaults_and_templates_render_inside_their_root() -> None:
    from datetime import UTC, datetime

    from service.delivery.template import Target, TemplateError, render
    from service.settings.sinks import template_of

    route = load_settings_doc(
        {"routes": [command_route(importer="none", deliver=[_share(), _web("http://h/in/{name}")])]}
    ).routes[0]
    share, web = route.deliver
    assert route.importer == "none"
    assert (share.send, share.exists, share.max_attempts, share.concurrency) == (
        "source",
        "fail",
        5,
        4,
    )
    assert (template_of(share), template_of(web)) == ("{relative_path}", "in/{name}")
    claimed = datetime(2026, 12, 7, 23, 59, tzinfo=UTC).timestamp()
    target = Target("a.tar.gz", "eu/a.tar.gz", "orders", "J1", "ab" * 32, claimed)
    assert render("{route}/{date:%Y/%m/%d}/{stem}{ext}", target) == "orders/2026/12/07/a.tar.gz"
    climbing = Target("x", "../../etc/x", "orders", "J1", "", claimed)
    with pytest.raises(TemplateError, match="not a plain relative path"):
        render("{relative_path}", climbing)
    with pytest.raises(TemplateError):
        render("{name}/", target)  # an empty last part


def load_settings_doc(doc: dict[str, object]) -> Settings:
    return Settings.model_validate(doc)
