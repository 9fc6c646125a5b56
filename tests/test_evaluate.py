"""chess_mlx.evaluate (multiple choice, strided perplexity, the results
table) and the lm-eval adapter, on tiny random models."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import WIKITEXT, ByteTokenizer, random_windows, tiny_llama

from chess_mlx.allocation import search_allocations
from chess_mlx.calibrate import calibrate
from chess_mlx.costs import model_params
from chess_mlx.errors import ChessError
from chess_mlx.evaluate import (
    Example,
    Task,
    at_equal_sparsity,
    encode_pair,
    equal_sparsity_markdown,
    EQUAL_SPEEDUP_TITLE,
    at_equal_speedup,
    eval_task,
    evaluate,
    load_task,
    loglikelihoods,
    main,
    markdown_table,
    plot_quality,
    run,
    score_continuations,
    setup_arg_parser,
    task_metrics,
)
from chess_mlx.perplexity import eval_ppl, format_change, paired_change, ppl_windows, token_windows, window_nll
from chess_mlx.sparsify import sparsify, unsparsify


class CharTokenizer(ByteTokenizer):
    """ByteTokenizer with the ids a harness needs and a (lossy) decode."""

    bos_token_id = 1
    eos_token_id = 2

    def decode(self, ids) -> str:
        return "".join(chr(32 + i % 95) for i in ids)


def reference_logprob(model, context, continuation) -> float:
    """log p(continuation | context) straight from one forward pass's logits."""
    tokens = context + continuation
    logprobs = nn.log_softmax(model(mx.array(tokens)[None, :-1]).astype(mx.float32), axis=-1)[0]
    return sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


@pytest.fixture(scope="module")
def llama():
    mx.random.seed(0)
    model = tiny_llama()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def thresholds(llama):
    return calibrate(llama, random_windows(), [0.3, 0.5, 0.7], progress=False)


def write_task(path, examples):
    path.write_text(json.dumps({"name": "ignored", "examples": examples}))
    return str(path)


TASK = [
    {"input": "The sky is ", "target_scores": {"blue": 1, "green": 0, "a very long answer": 0}},
    {"input": "Two plus two", "target_scores": {"four": 1, "five": 0}},
    {"input": "Water is", "target_scores": {"wet": 0, "dry": 0, "liquid": 1}},
]


def test_scores_match_logits_of_a_full_forward_pass(tiny_model):
    context = [5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 55, 21, 8, 30, 44, 19, 71, 26]  # longer than gemma's window
    continuations = [[9, 4, 77], [60], [13, 13, 13, 13, 13], [99, 1]]
    scores = score_continuations(tiny_model, context, continuations, batch_size=3)
    for (got, _), continuation in zip(scores, continuations):
        assert got == pytest.approx(reference_logprob(tiny_model, context, continuation), abs=1e-4)


def test_greedy_flag(llama):
    context, greedy = [3, 1, 4, 1, 5], []
    for _ in range(3):
        logits = llama(mx.array(context + greedy)[None])[0, -1]
        greedy.append(mx.argmax(logits).item())
    other = [(greedy[0] + 1) % 101] + greedy[1:]
    (_, is_greedy), (_, not_greedy) = score_continuations(llama, context, [greedy, other])
    assert is_greedy and not not_greedy


def test_encode_pair_follows_lm_eval():
    tokenizer = CharTokenizer()
    assert encode_pair(tokenizer, "abc ", "d") == (tokenizer.encode("abc"), tokenizer.encode(" d"))
    assert encode_pair(tokenizer, "", "hi") == ([1], tokenizer.encode("hi"))


def test_loglikelihoods_group_by_context_and_keep_order(llama):
    tokenizer = CharTokenizer()
    requests = [("Once upon", " a time"), ("Hello", " world"), ("Once upon", " b"), ("", "x y")]
    results = loglikelihoods(llama, tokenizer, requests, progress=False)
    for (context, continuation), (score, _) in zip(requests, results):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        assert score == pytest.approx(reference_logprob(llama, ctx, cont), abs=1e-4)
    cut = loglikelihoods(llama, tokenizer, [("a long context here", " end")], max_length=6, progress=False)
    ctx, cont = encode_pair(tokenizer, "a long context here", " end")
    assert cut[0][0] == pytest.approx(reference_logprob(llama, ctx[-2:], cont), abs=1e-4)


def test_acc_norm_divides_by_choice_bytes():
    examples = [Example("q", ["a", "bbbbbbbbbb"], [1]), Example("q", ["é", "cc"], [0])]
    # Example 1: sums pick "a" (-2 > -5), per byte picks the long one (-0.5 > -2).
    # Example 2: "é" is two bytes: -3/2 = -1.5 > -4/2 = -2, and -3 > -4 too.
    metrics = task_metrics(examples, [[-2.0, -5.0], [-3.0, -4.0]])
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 1.0
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 2))
    assert metrics["acc_norm_stderr"] == 0.0 and metrics["examples"] == 2


def test_task_aggregation_matches_per_choice_scores(llama, tmp_path):
    task = load_task(write_task(tmp_path / "toy.json", TASK), limit=2)
    assert task.name == "toy" and len(task.examples) == 2
    assert task.examples[0].context == "The sky is" and task.examples[0].gold == [0]
    tokenizer = CharTokenizer()
    logliks = [[reference_logprob(llama, *encode_pair(tokenizer, e.context, " " + c)) for c in e.choices]
               for e in task.examples]
    got = eval_task(llama, tokenizer, task, progress=False)
    expected = task_metrics(task.examples, logliks)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("examples, message", [
    ({"examples": [{"input": "x"}]}, "not a BIG-bench task"),
    ({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]}, "a correct one"),
])
def test_bad_task_files_are_one_clear_error(tmp_path, examples, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(examples))
    with pytest.raises(ChessError, match=message):
        load_task(str(path))
    with pytest.raises(ChessError, match="not found"):
        load_task(str(tmp_path / "missing.json"))


def test_strided_windows_score_every_token_once(llama):
    tokenizer = CharTokenizer()
    documents = ["x" * 50 + "".join(chr(97 + i % 26) for i in range(70)), "short doc of forty characters, about so"]
    windows, scored = ppl_windows(documents, tokenizer, window=32, stride=12)
    assert sum(scored) == sum(len(tokenizer.encode(d)) - 1 for d in documents)
    assert all(len(w) <= 32 and 0 < s < len(w) for w, s in zip(windows, scored))
    assert ppl_windows(documents, tokenizer, 32) == (token_windows(documents, tokenizer, 32),
                                                    [len(w) - 1 for w in token_windows(documents, tokenizer, 32)])
    capped, capped_scored = ppl_windows(documents, tokenizer, 32, stride=12, num_tokens=40)
    assert sum(capped_scored) == 39
    window = windows[1]
    full = nn.losses.cross_entropy(llama(mx.array(window)[None, :-1]), mx.array(window)[None, 1:])[0]
    assert window_nll(llama, window, scored[1]).item() == pytest.approx(full[-scored[1]:].sum().item(), rel=1e-5)
    assert math.isfinite(eval_ppl(llama, windows, progress=False, scored=scored)["ppl"])
    with pytest.raises(ChessError, match="stride"):
        ppl_windows(documents, tokenizer, 32, stride=33)


def test_evaluate_rows_per_method_and_sparsity(llama, thresholds):
    tokenizer = CharTokenizer()
    windows = ([w for w in random_windows(2, 33)], [32, 32])
    task = Task("toy", [Example(e["input"].rstrip(), list(e["target_scores"]), [i for i, s in
                        enumerate(e["target_scores"].values()) if s]) for e in TASK])
    rows = evaluate(llama, tokenizer, thresholds, ["dense", "cats", "chess+"], [0.5, 0.7], windows, [task],
                    progress=False)
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("cats", 0.5), ("cats", 0.7), ("chess+", 0.5), ("chess+", 0.7)]
    assert rows[0]["realized_sparsity"] == {}
    assert rows[0]["perplexity"]["ppl"] == pytest.approx(eval_ppl(llama, windows[0], progress=False)["ppl"])
    assert set(rows[3]["realized_sparsity"]) == {"gate", "q_proj", "o_proj"}
    assert rows[2]["realized_sparsity"]["gate"] > rows[1]["realized_sparsity"]["gate"]
    assert rows[1]["mean_acc_norm"] == rows[1]["tasks"]["toy"]["acc_norm"]
    assert not any(hasattr(m, "_tracker") for _, m in llama.named_modules() if type(m).__name__.startswith("Sparse"))
    table = markdown_table(rows, ["toy"]).splitlines()
    assert table[0] == "| method | target | ideal | realized ideal | ppl | vs dense | toy | mean | realized sparsity |"
    assert len(table) == 7
    assert "vs_dense" not in rows[0]
    for row in rows[1:]:  # paired on the same windows, the change is the ratio of perplexities
        change = row["vs_dense"]["ppl_change"]
        assert change == pytest.approx(row["perplexity"]["ppl"] / rows[0]["perplexity"]["ppl"] - 1, rel=1e-6)
        assert row["vs_dense"]["ppl_change_stderr"] > 0
    ideal = [r["ideal_speedup"] for r in rows]
    assert ideal[0] == 1.0 and 1 < ideal[1] < ideal[2] < ideal[4] and ideal[3] > ideal[1]
    for row in rows[1:]:  # the realized sparsity is near the target on the calibration's own kind of data
        assert row["ideal_speedup_realized"] == pytest.approx(row["ideal_speedup"], rel=0.15)


def test_run_writes_json_markdown_and_plot(llama, thresholds, tmp_path, capsys):
    thresholds_file = tmp_path / "t.safetensors"
    thresholds.save(str(thresholds_file))
    sparsify(llama, thresholds, "chess", 0.5)  # run() starts from any state
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} " + "words and more words " * 4 for i in range(4)))
    task = write_task(tmp_path / "toy.json", TASK)
    out = {k: str(tmp_path / f"r.{k}") for k in ("json", "md", "png")}
    args = setup_arg_parser().parse_args([
        "--thresholds", str(thresholds_file), "--methods", "dense,chess", "--sparsity", "0.5",
        "--ppl", str(text), "--window", "40", "--stride", "20", "--tokens", "150", "--tasks", task, "--limit", "2",
        "--output", out["json"], "--markdown", out["md"], "--plot", out["png"]])
    rows = run(args, llama, CharTokenizer(), "tiny")
    report = json.loads(open(out["json"]).read())
    assert report["model"] == "tiny" and len(report["rows"]) == 2 == len(rows)
    assert report["rows"][1]["tasks"]["toy"]["examples"] == 2
    markdown = open(out["md"]).read()
    assert markdown.count("\n") >= 4 and EQUAL_SPEEDUP_TITLE in markdown
    assert report["at_equal_ideal_speedup"][0]["ideal_speedup"] == 1.25
    assert open(out["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:4] == ["method", "target", "ideal", "realized"] and printed[3].startswith("chess")
    unsparsify(llama)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "x.json", "--methods", "dense,foo"], "unknown method 'foo'"),
    (["--methods", "dense"], "nothing to evaluate"),
    (["--tasks", "x.json", "--limit", "0"], "--limit must be positive"),
    (["--tasks", "x.json", "--output", "no/such/folder/r.json"], "does not exist"),
    (["--ppl", "x.txt", "--spread"], "--spread needs --tokens"),
])
def test_cli_errors_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "--window must be positive"),
    (["--tokens", "-3"], "--tokens must be positive"),
    (["--spread"], "--spread needs --tokens"),
])
def test_perplexity_cli_errors_before_loading(argv, message, capsys):
    from chess_mlx.perplexity import main as perplexity_main

    with pytest.raises(SystemExit) as exit_info:
        perplexity_main(["--data", "no/such/file.txt", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# The lm-eval adapter (optional extra 'eval').


@pytest.fixture
def chess_lm(llama, thresholds):
    adapter = pytest.importorskip("chess_mlx.lm_eval_adapter", exc_type=ImportError)
    yield adapter.ChessLM(llama, thresholds, "chess", 0.5, tokenizer=CharTokenizer(), max_length=64)
    unsparsify(llama)


def instances(request_type, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, i) for i, args in enumerate(args_list)]


def test_adapter_loglikelihood_and_sparsity(chess_lm, llama):
    pairs = [("Question: why", " because"), ("Question: why", " no"), ("Other", " one")]
    got = chess_lm.loglikelihood(instances("loglikelihood", pairs))
    assert got == loglikelihoods(llama, chess_lm.tokenizer, pairs, progress=False)
    assert 0.3 < chess_lm.realized_sparsity()["gate"] < 0.7


def test_adapter_rolling_scores_each_token_once(chess_lm, llama):
    text = "a rolling text long enough for two windows of sixty-four tokens, as lm-eval cuts them."
    tokens = [1] + chess_lm.tokenizer.encode(text)
    expected = -window_nll(llama, tokens).item()
    (got_short,) = chess_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    chess_lm.max_length = 1000
    (got_long,) = chess_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert got_long == pytest.approx(expected, rel=1e-5)
    assert len(tokens) > 64 and got_short != pytest.approx(got_long) and math.isfinite(got_short)


def test_adapter_generate_until_is_greedy_and_stops(chess_lm, llama):
    tokenizer = chess_lm.tokenizer
    prompt, greedy = tokenizer.encode("Tell me"), []
    for _ in range(6):
        greedy.append(mx.argmax(llama(mx.array(prompt + greedy)[None])[0, -1]).item())
    text = tokenizer.decode(greedy)
    stop = text[3]
    requests = [("Tell me", {"until": ["\u2603"], "max_gen_toks": 6}),
                ("Tell me", {"until": [stop], "max_gen_toks": 6})]
    full, cut = chess_lm.generate_until(instances("generate_until", requests))
    assert full == text and cut == text[: text.index(stop)]


def test_adapter_runs_a_local_task_through_the_harness(chess_lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [{"question": f"Question {i}: which one?", "choices": ["yes", "no way", "maybe so"], "answer": i % 3}
            for i in range(5)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "data.jsonl"}
  cache_dir: {tmp_path / "cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(model=chess_lm, tasks=["tiny_mc"], task_manager=manager)["results"]["tiny_mc"]
    examples = [Example(r["question"], r["choices"], [r["answer"]]) for r in rows]
    ours = eval_task(chess_lm.model, chess_lm.tokenizer, Task("tiny_mc", examples), progress=False)
    assert results["acc,none"] == pytest.approx(ours["acc"])
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_adapter_cli_errors_before_loading(capsys):
    adapter = pytest.importorskip("chess_mlx.lm_eval_adapter", exc_type=ImportError)
    with pytest.raises(SystemExit) as exit_info:
        adapter.main(["--tasks", "piqa", "--methods", "chess,foo"])
    assert exit_info.value.code == 2 and "unknown method 'foo'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_smollm2(tmp_path):
    from chess_mlx.utils import load

    model, tokenizer, _ = load(dtype="float32")
    windows = token_windows([WIKITEXT.read_text()[:4000]], tokenizer, 256, 256)
    thresholds_file = tmp_path / "t.safetensors"
    calibrate(model, windows, [0.5], progress=False).save(str(thresholds_file))
    task = str(WIKITEXT.parent / "bigbench" / "social_iqa.json")
    out = tmp_path / "r.json"
    main(["--dtype", "float32", "--thresholds", str(thresholds_file), "--methods", "dense,chess+",
          "--sparsity", "0.5", "--ppl", str(WIKITEXT), "--documents", "30:", "--window", "64", "--tokens", "64",
          "--tasks", task, "--limit", "2", "--output", str(out), "--markdown", str(tmp_path / "r.md"),
          "--plot", str(tmp_path / "r.png")])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "chess+"]
    assert 1 < rows[0]["perplexity"]["ppl"] < rows[1]["perplexity"]["ppl"] < 1000
    assert abs(rows[1]["realized_sparsity"]["gate"] - 0.5) < 0.15


def test_spread_windows_cover_the_documents_evenly():
    tokenizer = CharTokenizer()
    documents = [chr(97 + i) * 200 for i in range(10)]  # ten documents of 200 characters
    windows, scored = ppl_windows(documents, tokenizer, 64, num_tokens=500, spread=True)
    assert sum(scored) >= 500 and len(windows) == 8  # 63 scored per window, three per document
    letters = {w[-1] for w in windows}
    assert len(letters) >= 8  # from nearly every document, not the first two or three
    first, _ = ppl_windows(documents, tokenizer, 64, num_tokens=500)
    assert len({w[-1] for w in first}) <= 3
    with pytest.raises(ChessError, match="needs --tokens"):
        ppl_windows(documents, tokenizer, 64, spread=True)
    with pytest.raises(ChessError, match="holds only"):
        ppl_windows(documents, tokenizer, 64, num_tokens=10**6, spread=True)


def test_paired_change_standard_error_by_hand():
    dense = {"window_nll": [10.0, 20.0], "window_tokens": [10, 10]}
    sparse = {"window_nll": [11.0, 20.0], "window_tokens": [10, 10]}
    change = paired_change(sparse, dense)
    # per-window loss differences 0.1 and 0.0: mean 0.05, stderr sqrt(100*(0.05^2)*2)/20 = 0.0354
    assert change["ppl_change"] == pytest.approx(math.expm1(0.05))
    assert change["ppl_change_stderr"] == pytest.approx(math.exp(0.05) * math.sqrt(2 * 100 * 0.05**2) / 20)
    assert format_change(change) == "+5.1% ± 3.7"
    with pytest.raises(ChessError, match="different windows"):
        paired_change(sparse, {"window_nll": [10.0], "window_tokens": [10]})


def test_methods_compare_at_equal_realized_sparsity():
    def row(method, gate, ppl, acc):
        return {"method": method, "sparsity": 0.5, "realized_sparsity": {"gate": gate},
                "perplexity": {"ppl": ppl}, "mean_acc_norm": acc}

    rows = [row("dense", 0.0, 10.0, 0.5), row("cats", 0.3, 12.0, 0.4), row("cats", 0.6, 20.0, 0.3),
            row("chess", 0.2, 11.0, 0.45), row("chess", 0.4, 11.0 * 4, 0.35)]
    table = at_equal_sparsity(rows)
    assert [e["realized_gate_sparsity"] for e in table] == [0.3, 0.6]
    # log-perplexity is linear in sparsity between chess' rows: halfway is the geometric mean
    assert table[0]["chess"]["ppl"] == pytest.approx(22.0)
    assert table[0]["chess"]["mean_acc_norm"] == pytest.approx(0.40)
    assert table[0]["cats"] == {"ppl": pytest.approx(12.0), "mean_acc_norm": pytest.approx(0.4)}
    assert table[1]["chess"] == {}  # 0.6 lies outside chess' measured range
    text = equal_sparsity_markdown(table)
    assert "| 0.300 | 12.00 (40.0) | 22.00 (40.0) |" in text and "| 0.600 | 20.00 (30.0) | - |" in text


def test_teal_and_searched_allocation_rows(llama, tmp_path):
    thresholds = calibrate(llama, random_windows(), [0.1 * i for i in range(1, 10)], progress=False)
    search_allocations(llama, thresholds, random_windows(2, 40, seed=3), [1.2, 1.4], progress=False)
    windows = ([w for w in random_windows(2, 33, seed=8)], [32, 32])
    rows = evaluate(llama, CharTokenizer(), thresholds, ["dense", "teal", "alloc"], [0.3], windows,
                    progress=False, speedups=[1.2, 1.4])
    assert [(r["method"], r["target"]) for r in rows] == [("dense", "0.00"), ("teal", "0.30"),
                                                          ("alloc", "1.20x"), ("alloc", "1.40x")]
    teal = rows[1]
    assert set(teal["realized_sparsity"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_in", "down_in"}
    # teal at s skips s of every projection's weights, the LM head excepted
    layer_params, head = model_params(llama)
    layers = sum(sum(p.values()) for p in layer_params)
    assert teal["ideal_speedup"] == pytest.approx(1 / (1 - 0.3 * layers / (layers + head)))
    for row, target in zip(rows[2:], [1.2, 1.4]):
        # the tiny model's three layers make coarse steps: the budget is met with some overshoot
        assert target <= row["ideal_speedup"] < target + 0.1
        assert row["ideal_speedup_realized"] == pytest.approx(row["ideal_speedup"], rel=0.1)
        # a random model's loss may fall as well as rise; it must change
        assert row["perplexity"]["ppl"] != pytest.approx(rows[0]["perplexity"]["ppl"], rel=1e-3)
    for row, level in zip(rows[2:], thresholds.allocation_head):
        assert ("lm_head" in row["realized_sparsity"]) == (level > 0)
    json.dumps(rows)  # plain Python numbers only
    table = at_equal_speedup(rows, [1.1, 5.0])
    assert "ppl" in table[0]["alloc"] and table[1]["alloc"] == {}


def test_frontier_merges_a_perplexity_run_with_a_task_run(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier", Path(__file__).parents[1] / "scripts" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)

    def row(method, target, speedup, **measured):
        return {"method": method, "target": target, "ideal_speedup": speedup, "ideal_speedup_realized": speedup,
                "realized_sparsity": {}, "tasks": {}, **measured}

    toy = {"acc_norm": 0.4, "acc_norm_stderr": 0.05}
    ppl_run = {"tasks": {}, "rows": [row("dense", "0.00", 1.0, perplexity={"ppl": 10.0}),
                                     row("teal", "0.30", 1.3, perplexity={"ppl": 11.0},
                                         vs_dense={"ppl_change": 0.1, "ppl_change_stderr": 0.02}),
                                     row("teal", "0.50", 1.6, perplexity={"ppl": 15.0})]}
    task_run = {"tasks": {"toy": "toy.json"}, "rows": [
        row("teal", "0.30", 1.3, perplexity={"ppl": 99.0}, mean_acc_norm=0.4, tasks={"toy": toy},
            vs_dense={"ppl_change": 8.9, "ppl_change_stderr": 0.5}),
        row("teal", "0.50", 1.6, perplexity={"ppl": 30.0}, vs_dense={"ppl_change": 2.0, "ppl_change_stderr": 0.1})]}
    rows = frontier.merge_rows([ppl_run, task_run])
    assert len(rows) == 3
    teal = rows[1]
    assert teal["perplexity"]["ppl"] == 11.0  # the first run's value wins
    assert teal["tasks"] == {"toy": toy} and teal["mean_acc_norm"] == 0.4
    table = markdown_table(rows, ["toy"])
    assert "| teal | 0.30 | 1.30x | 1.30x | 11.000 | +10.0% ± 2.0 | 40.0 ± 5.0 | 40.0 | - |" in table
    # the second run's change against dense belongs to its perplexity, not to the first run's
    assert "| teal | 0.50 | 1.60x | 1.60x | 15.000 | - | - | - | - |" in table
    plot_quality(rows, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
