"""Fixtures: `tiefsee serve` on the fixture model (the one run.sh started, named by `TIEFSEE_URL`, or one
started here), one behind an API key, and one whose chat template is DeepSeek-R1's."""

import json
import os
import shutil
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiefsee_server import FIXTURE_MODEL, R1_TEMPLATE, Server  # noqa: E402

API_KEY = "sk-tiefsee-e2e"


@pytest.fixture(scope="session")
def base_url():
    url = os.environ.get("TIEFSEE_URL")
    if url:
        yield url.rstrip("/")
        return
    with Server(FIXTURE_MODEL) as server:
        yield server.url


@pytest.fixture(scope="session")
def client(base_url):
    # The server needs no key here; the client insists on one.
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def keyed_url():
    with Server(FIXTURE_MODEL, ["--api-key", API_KEY]) as server:
        yield server.url


@pytest.fixture(scope="session")
def tight_url():
    """One running sequence and one waiting: a third concurrent request must be refused with 429."""
    with Server(FIXTURE_MODEL, ["--max-seqs", "1", "--max-waiting", "1"]) as server:
        yield server.url


@pytest.fixture(scope="session")
def r1_url(tmp_path_factory):
    """The fixture model with DeepSeek-R1's template, which opens `<think>` after `<｜Assistant｜>`:
    everything the random model writes is then reasoning."""
    model = tmp_path_factory.mktemp("deepseek-v3-r1")
    for f in FIXTURE_MODEL.iterdir():
        if f.is_file() and not f.name.startswith("golden"):
            shutil.copy(f, model / f.name)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = R1_TEMPLATE.read_text()
    (model / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    with Server(model) as server:
        yield server.url
