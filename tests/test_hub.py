"""Models and datasets by their Hugging Face Hub names, offline: a Hub cache built by hand in a temporary
HF_HUB_CACHE (models--ORG--NAME/blobs, snapshots/<commit>/ linking to them, refs/main), datasets saved with
save_to_disk or held in a temporary datasets cache, and the Hub's "not found" answers from a mock transport."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import httpx2
import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from gspo_engine.build_models import model_source
from gspo_engine.cli import main
from gspo_engine.config import config_from_dict
from gspo_engine.data import DataError, dataset_rows, dataset_source
from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.hub import HubError, ModelId, download_model, parse_dataset_id, parse_model_id
from gspo_engine.planner import plan_model_args
from gspo_engine.tiny import build_tiny_checkpoint
from gspo_engine.trainer import GSPOTrainer, TrainingError

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROWS = [{"prompt": f"<copy>{a}{b}=", "answer": f"{a}{b}"} for a in "0123" for b in "456"]


def cache_model(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """`source`'s files as huggingface_hub stores a download: content-named blobs, a snapshot of links to them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_dataset(cache: Path, repo_id: str, rows: list[dict], workdir: Path, commit: str = COMMIT) -> Path:
    """`rows` as the datasets cache holds a Hub dataset's prepared train split: ORG___NAME/default/0.0.0/<commit>/
    with dataset_info.json and NAME-train.arrow (written by datasets' own JSON builder)."""
    workdir.mkdir(parents=True)
    data_file = workdir / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    builder = datasets.load_dataset_builder("json", data_files={"train": str(data_file)}, cache_dir=str(workdir))
    builder.download_and_prepare()
    org, name = repo_id.split("/")
    target = cache / f"{org}___{name}" / "default" / "0.0.0" / commit
    target.mkdir(parents=True)
    shutil.copyfile(Path(builder.cache_dir) / "dataset_info.json", target / "dataset_info.json")
    shutil.copyfile(Path(builder.cache_dir) / "json-train.arrow", target / f"{name}-train.arrow")
    return target


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with empty temporary caches, as huggingface_hub and datasets read them (both read the
    environment once, at import, so their constants are set as well)."""
    hub_cache, datasets_cache = tmp_path / "hf" / "hub", tmp_path / "hf" / "datasets"
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
    return hub_cache, datasets_cache


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    # seed 7: not the tiny default's seed 0, so weights read from the cache are told apart from a fresh build
    return build_tiny_checkpoint("tiny-moe", tmp_path / "built" / "tiny-moe", seed=7)


def run_config(tmp_path, model: str, **data) -> object:
    return config_from_dict({
        "model": {"name_or_path": model},
        "data": {"builtin": {"tasks": ["copy"], "min_length": 2, "max_length": 2, "num_rows": 16}} | data,
        "rewards": [{"function": "digit_match"}],
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
        "gspo": {"num_minibatches": 1},
        "train": {"steps": 1},
        "output_dir": str(tmp_path / "run"),
    })


def test_model_and_dataset_ids_parse_as_the_hub_writes_them():
    assert parse_model_id("Qwen/Qwen3-0.6B") == ModelId("Qwen/Qwen3-0.6B")
    assert parse_model_id("Qwen/Qwen3-8B@refs/pr/3") == ModelId("Qwen/Qwen3-8B", "refs/pr/3")
    for not_an_id in ("tiny-moe", "runs/x/final", "./model", "/models/Qwen3-8B", "Qwen/Qwen3-8B@", "a--b/c"):
        assert parse_model_id(not_an_id) is None, not_an_id
    assert parse_dataset_id("openai/gsm8k:train[:100]").split == "train[:100]"
    assert parse_dataset_id("gsm8k").repo_id == "gsm8k" and parse_dataset_id("gsm8k").split is None
    assert parse_dataset_id("a/b/c") is None and parse_dataset_id("gsm8k:") is None


def test_a_cached_hub_model_trains_offline_and_the_run_records_its_commit(tmp_path, offline, tiny_model):
    snapshot = cache_model(offline[0], "acme/tiny-moe", tiny_model)
    trainer = GSPOTrainer(run_config(tmp_path, "acme/tiny-moe"), echo=lambda *a, **k: None)
    assert trainer.source == snapshot
    cached = load_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, cached[name]) for name, value in trainer.model.state_dict().items())
    trainer.train()
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "name_or_path: acme/tiny-moe\n" in recorded
    assert f"revision: {COMMIT}\n" in recorded and f"resolved_folder: {snapshot.resolve()}\n" in recorded
    # The saved model carries the tokenizer that the cache held behind links.
    assert (tmp_path / "run" / "final" / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_revisions_of_a_cached_model(tmp_path, offline, tiny_model):
    snapshot = cache_model(offline[0], "acme/tiny-moe", tiny_model)
    assert download_model(parse_model_id(f"acme/tiny-moe@{COMMIT}")).folder == snapshot
    same = model_source(run_config(tmp_path, "acme/tiny-moe@main"), tmp_path)
    assert (same.folder, same.repo_id, same.revision) == (snapshot, "acme/tiny-moe", COMMIT)
    with pytest.raises(HubError, match="name two revisions"):
        download_model(parse_model_id("acme/tiny-moe@main"), revision="v2")
    with pytest.raises(HubError, match=r"acme/tiny-moe@v2 is not in the Hugging Face cache \(.*\) and downloads are "
                                       r"off .*hf download acme/tiny-moe --revision v2"):
        download_model(parse_model_id("acme/tiny-moe"), revision="v2")


def test_a_local_folder_wins_over_the_hub_id_of_its_name(tmp_path, offline, tiny_model, monkeypatch):
    cache_model(offline[0], "acme/tiny-moe", tiny_model)
    local = build_tiny_checkpoint("tiny-moe", tmp_path / "work" / "acme" / "tiny-moe", seed=3)
    monkeypatch.chdir(tmp_path / "work")
    found = model_source(run_config(tmp_path, "acme/tiny-moe"), tmp_path)
    assert found.folder.resolve() == local.resolve() and found.repo_id is None and found.revision is None
    with pytest.raises(TrainingError, match="model.revision: v1 picks a revision of a Hub model"):
        model_source(config_from_dict({"model": {"name_or_path": "acme/tiny-moe", "revision": "v1"}}), tmp_path)
    (tmp_path / "work" / "empty" / "folder").mkdir(parents=True)
    with pytest.raises(TrainingError, match="neither a model folder with config.json, nor a Hugging Face Hub id"):
        model_source(run_config(tmp_path, "empty/folder"), tmp_path)


@pytest.mark.parametrize("unreleased, released", [
    ("Qwen3-Coder-7B-Instruct", ["Qwen/Qwen3-Coder-30B-A3B-Instruct"]),
    ("Qwen3-Omni-7B", ["Qwen/Qwen3-Omni-30B-A3B-Instruct"]),
    ("Qwen3-Next-7B", ["Qwen/Qwen3-Next-80B-A3B-Instruct"]),
    ("Qwen3-7B", ["Qwen/Qwen3-8B"]),
    ("Qwen3-72B-MoE", ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"]),
])
def test_unreleased_qwen_names_fail_offline_naming_released_ones(tmp_path, offline, unreleased, released):
    with pytest.raises(HubError) as failure:
        model_source(run_config(tmp_path, f"Qwen/{unreleased}"), tmp_path)
    message = str(failure.value)
    assert f"{unreleased} is not a released Qwen3 model" in message and "HF_HUB_OFFLINE=1" in message
    assert all(name in message for name in released), message
    # The planner knows the same table: a dry run of the unreleased name fails the same way.
    with pytest.raises(ValueError, match=released[0]):
        plan_model_args(f"Qwen/{unreleased}")


def test_a_released_model_missing_offline_says_what_to_download(tmp_path, offline):
    with pytest.raises(HubError) as failure:
        model_source(run_config(tmp_path, "Qwen/Qwen3-8B"), tmp_path)
    message = str(failure.value)
    assert "hf download Qwen/Qwen3-8B" in message and str(offline[0]) in message
    assert "not a released" not in message


@pytest.fixture
def hub_answers(tmp_path, monkeypatch):
    """Online, with an empty cache, and every request huggingface_hub sends answered by the function the test
    sets in answers[0]; the requests are recorded as "METHOD /path"."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    answers, requests = [], []

    def answer(request: httpx2.Request) -> httpx2.Response:
        requests.append(f"{request.method} {request.url.path}")
        return answers[0](request)

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(answer)))
    yield answers, requests
    set_client_factory(default_client_factory)


@pytest.fixture
def mocked_hub(hub_answers):
    """The Hub answering 404 with the error code it sends for a missing repository (or revision, for URLs
    naming v9)."""
    answers, requests = hub_answers

    def not_found(request: httpx2.Request) -> httpx2.Response:
        code = "RevisionNotFound" if "/revision/v9" in str(request.url) else "RepoNotFound"
        return httpx2.Response(404, headers={"X-Error-Code": code}, json={"error": "not found"}, request=request)

    answers.append(not_found)
    return requests


def test_a_download_fetches_only_the_files_a_run_reads(tmp_path, hub_answers, tiny_model):
    answers, requests = hub_answers
    files = {path.name: path.read_bytes() for path in tiny_model.iterdir()}
    unread = {"README.md": b"# card", "original/consolidated.pth": b"x" * 64, "pytorch_model.bin": b"y" * 64}
    served = files | unread
    resolve = f"/acme/tiny-moe/resolve/{COMMIT}/"

    def repository(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path == "/api/models/acme/tiny-moe/revision/main":
            return httpx2.Response(200, json={"id": "acme/tiny-moe", "sha": COMMIT}, request=request)
        if path == f"/api/models/acme/tiny-moe/tree/{COMMIT}":
            return httpx2.Response(200, request=request, json=[
                {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                for name, body in served.items()
            ])
        if path.startswith(resolve):
            body = served[path.removeprefix(resolve)]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                       "Content-Length": str(len(body))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body,
                                   request=request)
        return httpx2.Response(404, request=request)

    answers.append(repository)
    found = model_source(run_config(tmp_path, "acme/tiny-moe"), tmp_path)
    assert (found.repo_id, found.revision) == ("acme/tiny-moe", COMMIT)
    assert found.folder == tmp_path / "hf" / "hub" / "models--acme--tiny-moe" / "snapshots" / COMMIT
    assert sorted(path.name for path in found.folder.iterdir()) == sorted(files)
    assert not any(name in request for request in requests for name in unread)
    assert all((found.folder / name).read_bytes() == body for name, body in files.items())


def test_the_hubs_not_found_answer_names_released_models(tmp_path, mocked_hub):
    with pytest.raises(HubError) as failure:
        model_source(run_config(tmp_path, "Qwen/Qwen3-7B"), tmp_path)
    assert "GET /api/models/Qwen/Qwen3-7B/revision/main" in mocked_hub
    message = str(failure.value)
    assert "the Hugging Face Hub has no model Qwen/Qwen3-7B" in message and "Qwen/Qwen3-8B" in message
    with pytest.raises(HubError, match=r"no model acme/missing \(a private one needs a login"):
        download_model(parse_model_id("acme/missing"))
    with pytest.raises(HubError, match="model.revision: v9 is not a branch, tag or commit of Qwen/Qwen3-8B"):
        download_model(parse_model_id("Qwen/Qwen3-8B@v9"))


def test_the_planner_reads_a_cached_config_without_downloading(offline, tiny_model):
    cache_model(offline[0], "acme/tiny-moe", tiny_model)
    args, source = plan_model_args("acme/tiny-moe")
    assert args.num_experts == 8 and "Hugging Face cache" in source
    args, source = plan_model_args("Qwen/Qwen3-8B@main")
    assert args.hidden_size == 4096 and "shapes of the released Qwen3-8B" in source
    with pytest.raises(ValueError, match="hf download Qwen/Qwen3-14B config.json"):
        plan_model_args("Qwen/Qwen3-14B")


def test_a_dry_run_plans_released_shapes_and_names_a_hub_dataset_without_reading_either(offline):
    def dry_run(model: str):
        return CliRunner().invoke(main, [
            "train", str(REPO / "configs" / "tiny-moe.yaml"), "--dry-run", "--model_name_or_path", model,
            "--dataset", "openai/gsm8k:test", "--set", "rewards=[{function: math}]",
        ])

    result = dry_run("Qwen/Qwen3-8B")
    assert result.exit_code == 0, result.output
    assert "shapes of the released Qwen3-8B" in result.output and "dataset: openai/gsm8k:test" in result.output
    assert not any(offline[0].iterdir()) and not offline[1].exists()  # nothing downloaded or cached
    result = dry_run("Qwen/Qwen3-Next-7B")
    assert result.exit_code == 1 and "Qwen/Qwen3-Next-80B-A3B-Instruct" in result.output


def test_save_to_disk_folders_give_their_rows(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    rows = dataset_rows(str(tmp_path / "one"))
    assert [row for _, row in rows] == ROWS and rows[3][0] == f"{tmp_path / 'one'}: row 3"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:5]), "test": datasets.Dataset.from_list(ROWS[5:]),
    }).save_to_disk(str(tmp_path / "splits"))
    assert [row for _, row in dataset_rows(str(tmp_path / "splits"))] == ROWS[:5]
    assert [row for _, row in dataset_rows(f"{tmp_path / 'splits'}:test")] == ROWS[5:]
    with pytest.raises(DataError, match=r"has no split 'dev'; choose one .*train, test"):
        dataset_rows(f"{tmp_path / 'splits'}:dev")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "only"))
    assert [row for _, row in dataset_rows(str(tmp_path / "only"))] == ROWS[:2]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="was not written by datasets' save_to_disk"):
        dataset_source(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="data.subset: 'main' picks a configuration of a Hub dataset"):
        dataset_rows(str(tmp_path / "one"), subset="main")


def test_a_hub_dataset_is_read_from_the_datasets_cache_offline(tmp_path, offline):
    cache_dataset(offline[1], "acme/digits", ROWS, tmp_path / "prepare")
    for spec in ("acme/digits", "acme/digits:train"):
        rows = dataset_rows(spec)
        assert [row for _, row in rows] == ROWS and rows[0][0] == "acme/digits:train: row 0"
    with pytest.raises(DataError, match=r'acme/digits:dev: Unknown split "dev"'):
        dataset_rows("acme/digits:dev")
    with pytest.raises(DataError, match=r"\(data.subset main\): .*config 'main'"):
        dataset_rows("acme/digits", subset="main")
    with pytest.raises(DataError, match=r"acme/nothing is not a local file or folder, nor in the datasets cache"):
        dataset_rows("acme/nothing")
    assert dataset_source("acme/nothing").kind == "hub"  # a dry run names it without looking it up
    with pytest.raises(DataError, match="dataset file missing.jsonl does not exist"):
        dataset_source("missing.jsonl")


def test_a_save_to_disk_dataset_trains(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "prompts"))
    trainer = GSPOTrainer(run_config(tmp_path, "tiny-moe", dataset=str(tmp_path / "prompts")), echo=lambda *a, **k: None)
    assert len(trainer.dataset) == len(ROWS) and trainer.dataset[0].columns == {"answer": ROWS[0]["answer"]}
    summary = trainer.train()
    assert summary.steps == 1 and (tmp_path / "run" / "final" / "config.json").is_file()


class RecordingApi:
    """HfApi's create_repo and upload_folder, recorded instead of sent."""

    calls: list = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def upload_folder(self, **options):
        self.calls.append(("upload_folder", options))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{options['repo_id']}/commit/1",
                                          commit_message="", commit_description="", oid="1")


def test_export_pushes_the_exported_folder_private_by_default(tmp_path, monkeypatch, tiny_model):
    import gspo_engine.hub.upload as upload

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(upload, "HfApi", RecordingApi)
    RecordingApi.calls = []
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(tiny_model), "--output", str(out), "--push-to-hub", "me/tiny"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert RecordingApi.calls == [
        ("create_repo", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"repo_id": "me/tiny", "folder_path": str(out), "repo_type": "model",
                           "commit_message": "Upload export exported by gspo-engine"}),
    ]
    assert "pushed" in result.output and "(private)" in result.output
    RecordingApi.calls = []
    result = CliRunner().invoke(main, ["export", str(tiny_model), "--output", str(tmp_path / "public"),
                                       "--push-to-hub", "me/tiny", "--public"])
    assert result.exit_code == 0, result.output
    assert RecordingApi.calls[0][2]["private"] is False
    # A bad repository name, or the offline mode, stops before anything is exported.
    result = CliRunner().invoke(main, ["export", str(tiny_model), "--output", str(tmp_path / "bad"),
                                       "--push-to-hub", "me/tiny@main"])
    assert result.exit_code == 1 and "is not a repository id" in result.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(main, ["export", str(tiny_model), "--output", str(tmp_path / "off"),
                                       "--push-to-hub", "me/tiny"])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE=1 forbids uploads" in result.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "off").exists()


@pytest.mark.slow
def test_the_cli_trains_from_a_hub_id_with_hf_hub_offline(tmp_path, tiny_model):
    """The acceptance command, in a fresh process that reads HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them."""
    snapshot = cache_model(tmp_path / "hub", "acme/tiny-moe", tiny_model)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "gspo_engine", "train", "configs/tiny-moe.yaml",
               "--model_name_or_path", "acme/tiny-moe", "--output_dir", str(tmp_path / "run"),
               "--set", "train.steps=2", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=4"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert f"revision: {COMMIT}\n" in recorded and f"resolved_folder: {snapshot.resolve()}\n" in recorded
    done = subprocess.run(command[:5] + ["--model_name_or_path", "Qwen/Qwen3-7B", "--output_dir", str(tmp_path / "x")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Qwen/Qwen3-8B" in done.stderr
