"""``python -m ghostserve_sglang.launch``: flags, environment, and refusals before SGLang starts."""

from __future__ import annotations

import pytest

from ghostserve_sglang import launch, models, settings
from ghostserve_sglang.settings import OPTIONS, Settings, SettingsError
from ghostserve_sglang.sglang.patching import compatibility, patches

BASE = ["--model-path", str(models.path()), "--device", "cpu"]


@pytest.mark.parametrize("flags, named", [
    (["--ghost-code", "raid5"], "--ghost-code=raid5"),
    (["--tp-size", "2", "--ghost-parity-shards", "2"], "--ghost-parity-shards=2"),
    (["--tp-size", "2", "--ghost-code", "rs", "--ghost-parity-shards", "2"], "--tp-size=2"),
    (["--tp-size", "1"], "--tp-size=1"),
    (["--tp-size", "250", "--ghost-code", "rs", "--ghost-parity-shards", "7"], "257"),
    (["--tp-size", "2", "--ghost-parity-shards", "0"], "--ghost-parity-shards=0"),
    (["--tp-size", "2", "--ghost-strict", "yes"], "--ghost-strict=yes"),
    (["--tp-size", "2", "--ghost-staging-mib", "lots"], "--ghost-staging-mib=lots"),
    (["--tp-size", "2", "--ghost-on-full", "panic"], "--ghost-on-full=panic"),
    (["--tp-size", "2", "--ghost-capture-queue-mib", "-1"], "--ghost-capture-queue-mib=-1"),
    (["--tp-size", "2", "--ghost-coordinator-port", "70000"], "--ghost-coordinator-port=70000"),
    (["--tp-size", "2", "--ghost-shm-dir", "shm"], "--ghost-shm-dir=shm"),
    (["--tp-size", "2", "--nnodes", "2"], "--nnodes=2 needs --dist-init-addr"),
])
def test_invalid_settings_fail_fast_with_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.main(BASE + flags)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ghostserve: error: ") and named in err


def test_a_coordinator_port_in_use_is_refused_in_one_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            launch.main([*BASE, "--tp-size", "2", "--ghost-coordinator-port", str(port)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"ghostserve: error: --ghost-coordinator-port={port}: cannot listen there")


def test_unsupported_sglang_fails_fast_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(patches, "sglang_version", lambda: "0.4.0")
    with pytest.raises(SystemExit):
        launch.main(BASE + ["--tp-size", "2"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sglang 0.4.0 is not supported" in err


def test_help_shows_sglang_and_ghostserve_flags(capsys):
    launch.main(["--help"])
    out = capsys.readouterr().out
    assert "--tp-size" in out and "--model-path" in out
    for option in OPTIONS:
        assert option.flag in out and option.env in out
    refused = " ".join(out.split("Refused at start")[1].split())
    for option in compatibility.REFUSED_OPTIONS:
        assert option.flag in refused
    assert "MLA" in refused and "0.5.22, 0.5.23" in refused


def test_every_flag_maps_to_one_environment_variable():
    chosen = Settings.from_values({"code": "rs", "parity_shards": "2", "strict": "true", "instance_id": "a"})
    assert Settings.from_env(chosen.to_env()) == chosen
    assert {o.env for o in OPTIONS} == set(chosen.to_env())
    assert all(o.env == "GHOSTSERVE_" + o.flag[len("--ghost-"):].replace("-", "_").upper() for o in OPTIONS)


def test_flags_win_over_environment():
    parser = __import__("argparse").ArgumentParser()
    settings.add_arguments(parser)
    namespace = parser.parse_args(["--ghost-code", "replicate"])
    chosen = settings.from_arguments(namespace, {"GHOSTSERVE_CODE": "rs", "GHOSTSERVE_STAGING_MIB": "8"})
    assert (chosen.code, chosen.staging_mib) == ("replicate", 8)
    with pytest.raises(SettingsError, match="GHOSTSERVE_STRICT"):
        Settings.from_env({"GHOSTSERVE_STRICT": "2"})


def test_banner_offers_text_chat_and_metrics_when_the_server_has_them():
    import types

    args = types.SimpleNamespace(host="127.0.0.1", port=30000, skip_tokenizer_init=False, enable_metrics=True,
                                 served_model_name="tiny")
    banner = launch._banner(args, "30000")
    assert '"text": ' in banner and "/v1/chat/completions" in banner and '"model": "tiny"' in banner
    assert "metrics: curl -s http://127.0.0.1:30000/metrics" in banner
    args.skip_tokenizer_init, args.enable_metrics = True, False
    banner = launch._banner(args, "30000")
    assert '"input_ids": ' in banner and "chat:" not in banner and "add --enable-metrics" in banner


def test_a_parity_store_larger_than_dev_shm_is_refused_at_start_in_one_line():
    # The server starts for real: the ranks find at scheduler start that their store cannot fit.
    import os
    import subprocess
    import sys

    from ghostserve_sglang.testing.local_server import CPU_FLAGS, eventually, free_port

    stat = os.statvfs("/dev/shm")
    too_much = (stat.f_bavail * stat.f_frsize >> 20) + 1024  # MiB of staging ring alone
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}
    launcher = subprocess.Popen([sys.executable, "-m", "ghostserve_sglang.launch", *BASE, *CPU_FLAGS[2:],
                                 "--tp-size", "1", "--port", str(port), "--max-total-tokens", "8192",
                                 "--ghost-code", "replicate", "--ghost-staging-mib", str(too_much)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group: every child is in it
    stdout, stderr = launcher.communicate(timeout=400)
    result = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ghostserve: error: the parity store needs "), last
    assert "/dev/shm" in last and "--ghost-staging-mib" in last
    assert "Traceback" not in result.stderr
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"ghostserve-{port}")]

    def group_ended() -> bool:  # its last processes may still be exiting
        group = subprocess.run(["ps", "-eo", "pgid=,stat=,pid=,comm="], capture_output=True, text=True).stdout
        alive = [line for line in group.splitlines()  # a zombie (Z) has ended; only init can reap it here
                 if line.split()[0] == str(launcher.pid) and not line.split()[1].startswith("Z")]
        assert not alive, alive
        return True

    eventually(group_ended, timeout_s=10)
