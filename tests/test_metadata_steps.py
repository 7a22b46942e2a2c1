"""Metadata steps produce the config and history BuildKit writes."""

from __future__ import annotations

import pytest

from lamina.engine.steps import metadata as md
from lamina.errors import InstructionError
from lamina.oci.image import Healthcheck, default_config

T = "2024-01-01T00:00:00Z"


def last(config):
    return config.history[-1]


def test_env_sets_in_place_and_appends_with_history():
    config = md.apply_env(default_config(), [("A", "1"), ("PATH", "/x")], T)
    assert config.config.env == ("PATH=/x", "A=1")
    entry = last(config)
    assert entry.created_by == "ENV A=1 PATH=/x"
    assert entry.empty_layer and entry.comment == "buildkit.dockerfile.v0" and entry.created == T


def test_label_merges_sorted():
    config = md.apply_label(default_config(), [("b", "2"), ("a", "x y")], T)
    config = md.apply_label(config, [("b", "3")], T)
    assert config.config.labels == (("a", "x y"), ("b", "3"))
    assert last(config).created_by == "LABEL b=3"


def test_expose_ranges_and_history():
    config = md.apply_expose(default_config(), ["80", "53/udp", "8000-8001"], T)
    assert config.config.exposed_ports == ("53/udp", "80/tcp", "8000/tcp", "8001/tcp")
    # BuildKit's dispatchExpose: the ports as parsed, in the order given (parseExpose sorted the words)
    assert last(config).created_by == "EXPOSE [80/tcp 53/udp 8000/tcp 8001/tcp]"


@pytest.mark.parametrize("spec", ["http", "80/xyz", "90-80"])
def test_expose_rejects_bad_ports(spec):
    with pytest.raises(InstructionError):
        md.apply_expose(default_config(), [spec], T)


def test_volume_user_shell_stopsignal_maintainer():
    config = md.apply_volume(default_config(), ["/data", "/var/log"], T)
    assert config.config.volumes == ("/data", "/var/log")
    assert last(config).created_by == "VOLUME [/data /var/log]"
    config = md.apply_user(config, "nobody", T)
    assert config.config.user == "nobody" and last(config).created_by == "USER nobody"
    config = md.apply_shell(config, ["/bin/ash", "-eo", "pipefail", "-c"], T)
    assert last(config).created_by == "SHELL [/bin/ash -eo pipefail -c]"
    config = md.apply_stopsignal(config, "SIGKILL", T)
    assert config.config.stop_signal == "SIGKILL"
    config = md.apply_maintainer(config, "me <me@x>", T)
    assert config.author == "me <me@x>" and last(config).created_by == "MAINTAINER me <me@x>"


@pytest.mark.parametrize("signal", ["9", "TERM", "SIGUSR1", "SIGRTMIN+3"])
def test_stopsignal_accepts(signal):
    md.check_signal(signal)


@pytest.mark.parametrize("signal", ["0", "SIGFOO", ""])
def test_stopsignal_rejects(signal):
    with pytest.raises(InstructionError):
        md.check_signal(signal)


def test_workdir_relative_and_history_layer_flag():
    config = md.apply_workdir(default_config(), "/app", T, has_layer=True)
    config = md.apply_workdir(config, "sub/../src", T, has_layer=True)
    assert config.config.working_dir == "/app/src"
    assert last(config).created_by == "WORKDIR /app/src" and not last(config).empty_layer
    config = md.apply_workdir(config, "/", T, has_layer=False)
    assert last(config).empty_layer


def test_cmd_shell_form_uses_shell_and_go_quoting():
    config = md.apply_cmd(default_config(), ["echo", '"hi"'], shell_form=True, created=T)
    assert config.config.cmd == ("/bin/sh", "-c", 'echo "hi"')
    assert config.config.args_escaped
    assert last(config).created_by == 'CMD ["/bin/sh" "-c" "echo \\"hi\\""]'


def test_entrypoint_drops_inherited_cmd_unless_set_in_stage():
    base = md.apply_cmd(default_config(), ["x"], shell_form=False, created=T)
    config = md.apply_entrypoint(base, ["/bin/sh", "-c"], shell_form=False, cmd_set=False, created=T)
    assert config.config.cmd is None
    assert last(config).created_by == 'ENTRYPOINT ["/bin/sh" "-c"]'
    kept = md.apply_entrypoint(base, ["run"], shell_form=False, cmd_set=True, created=T)
    assert kept.config.cmd == ("x",)


def test_healthcheck_history_matches_go_struct_print():
    check = Healthcheck(test=("CMD-SHELL", "true"), interval=30_000_000_000, timeout=1_500_000_000, retries=3)
    config = md.apply_healthcheck(default_config(), check, T)
    assert config.config.healthcheck == check
    assert last(config).created_by == 'HEALTHCHECK &{["CMD-SHELL" "true"] "30s" "1.5s" "0s" "0s" \'\\x03\'}'


@pytest.mark.parametrize(
    ("ns", "text"),
    [(0, "0s"), (90_000_000_000, "1m30s"), (500_000_000, "500ms"), (7_200_000_000_000, "2h0m0s")],
)
def test_go_duration(ns, text):
    assert md.go_duration(ns) == text


def test_onbuild_has_no_history():
    config = md.apply_onbuild(default_config(), "RUN echo hi")
    assert config.config.on_build == ("RUN echo hi",) and not config.history
    assert md.clear_onbuild(config).config.on_build == ()


def test_run_created_by_lists_stage_args():
    assert md.run_created_by(["/bin/sh", "-c", "make"], []) == "RUN /bin/sh -c make"
    text = md.run_created_by(["/bin/sh", "-c", "make"], [("A", "1"), ("B", ""), ("A", "2")])
    assert text == "RUN |2 A=2 B= /bin/sh -c make"
    config = md.add_history(default_config(), text, created=T, empty_layer=False, ran=True)
    assert last(config).created_by.endswith("make # buildkit")


def test_copy_created_by_records_chown_not_from():
    text = md.copy_created_by("COPY", ["a", "b"], "/dst/", chown="1:2", chmod="755")
    assert text == "COPY --chown=1:2 --chmod=755 a b /dst/"


def test_ensure_path_and_merge_labels():
    from lamina.oci.image import ImageConfig

    config = md.ensure_path(ImageConfig())
    assert config.config.env[0].startswith("PATH=/usr/local/sbin")
    assert md.merge_labels(config, [("k", "v")]).config.labels == (("k", "v"),)
    assert len(md.merge_labels(config, [("k", "v")]).history) == 0
