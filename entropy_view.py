"""
entropy_view.py -- see where a model is uncertain: every sampled token coloured by its entropy, and
the paper's Section 2 statistics in small (pivotal and reflective words against all other tokens).

Where it sits: beside evaluate.py, reading what rollout.sample records for training (H_t per token).

    problems -> rollout.sample (tokens, entropies) -> [colour each token]  -> terminal + entropy.html
                                                   -> [group by word list] -> table + entropy_stats.json

    python entropy_view.py --model smollm2-135m --task arith --limit 4 --n 2 --max-new-tokens 64
    python entropy_view.py --task arith:4 --limit 16 --n 4 --max-new-tokens 128 --out runs/entropy
    python entropy_view.py --limit 2 --color always | less -R   # page through the colours
    # or open runs/entropy/entropy.html in a browser (hover a token for its entropy)

The paper (Section 2) finds that high-entropy tokens mark exploratory reasoning: pivotal connectors
("because", "however", "first") and reflective actions ("verify", "check") have higher entropy than
the rest. This script measures the same on our models. Simplifications, said up front:
  1. Token-level keyword matching, for both groups. The paper scores reflective *sentences* (mean
     entropy of a sentence flagged by its keywords); we score the keyword token itself.
  2. The word lists are ours (the paper does not publish its list) and ignore sense: "so" in "do so"
     and "second" in "a second step" count as connectors.
  3. A word split into several tokens counts its first token, where the model decides on the word;
     its other pieces count as "other" (they are nearly forced once the word has begun).
  4. The standard error treats tokens as independent. Tokens of one answer are correlated, so the
     true uncertainty is larger; compare groups whose means differ by several standard errors.
  5. Entropies are at the sampling temperature (0.6 by default, the paper's evaluation setting),
     lower than at temperature 1.
"""

import bisect
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace

# -----------------------------------------------------------------------------------------------
# The word lists: edit freely. Lower case; a word matches whatever its case and surrounding
# punctuation ("So,", "BUT"). Inflections are separate words ("suggest" does not match "suggests").

PIVOTAL = {
    # causal: the step follows from what came before
    "causal": ["because", "therefore", "so", "thus", "hence", "since"],
    # contrastive: the reasoning turns
    "contrastive": ["but", "however", "although", "though", "yet", "instead"],
    # sequential: the plan of the solution
    "sequential": ["first", "then", "next", "finally", "second", "third"],
    # reasoning verbs: the model draws or sets up an inference
    "reasoning verbs": ["suggest", "suggests", "demonstrate", "demonstrates", "means", "implies", "assume",
                        "assuming", "consider", "considering", "conclude", "notice", "note"],
}
# reflective phrases: the model looks back at its own work
REFLECTIVE = ["wait", "verify", "check", "recheck", "double-check", "hmm", "actually", "alternatively",
              "mistake", "reconsider", "oops", "re-examine", "confirm"]

H_MAX = 3.0  # nats: the top of the colour scale; larger entropies get its colour (SmolLM2 at T=0.6 rarely exceeds it)
# colour stops from 0 to H_MAX: white (the model is sure) -> yellow -> orange -> red (the model hesitates)
STOPS = [(0.0, (255, 255, 255)), (1 / 3, (255, 237, 160)), (2 / 3, (253, 141, 60)), (1.0, (215, 25, 28))]
ROWS_PER_CALL = 32  # answers sampled together: more keep a GPU busy, fewer waste less decoding rows that stopped early

WORD_GROUP = {w: g for g, words in PIVOTAL.items() for w in words}
_twice = set(WORD_GROUP) & set(REFLECTIVE)
if _twice:
    raise ValueError(f"{sorted(_twice)} in both PIVOTAL and REFLECTIVE: keep each word in one list")
WORD_GROUP.update({w: "reflective" for w in REFLECTIVE})
# a word: letters, with inner hyphens or apostrophes ("double-check", "let's"); digits and "_" excluded
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


@dataclass
class Answer:
    """One sampled answer, as the views need it."""

    question: str
    gold: str
    correct: bool
    tokens: list  # the text of each response token (" because", "\n", "<|im_end|>"): see decode_tokens
    entropies: list  # H_t of each token, nats


# -----------------------------------------------------------------------------------------------
# Entropy statistics: pure functions over token strings and entropies. The paper's Section 2 puts
# the mean entropy of connector tokens beside that of all other tokens and finds it higher: the
# model forks at "so" and "but", and copies digits it has already decided. That is the
# observation behind its advantage term, which rewards exactly these uncertain positions.


def match_words(tokens: list) -> list:
    """For each token, (group, word) if it starts a listed word, else None.

    We join the tokens into the text, find its words, and mark the token holding each listed word's
    first character: " because" (one token) and " there"+"fore" (its first piece) count, while
    " some" is not "so" and " sol"+"ve" is not "so" (the whole word must be on a list).
    """
    starts, pos = [], 0  # starts[i]: offset of token i in the joined text
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    marks = [None] * len(tokens)
    for m in _WORD.finditer("".join(tokens)):
        word = m.group().lower().replace("’", "'")
        i = bisect.bisect_right(starts, m.start()) - 1  # the token holding the word's first character
        if word in WORD_GROUP and marks[i] is None:
            marks[i] = (WORD_GROUP[word], word)
    return marks


def _summary(values: list) -> dict:
    """count, mean and standard error (sample std / sqrt(count)); None where undefined (JSON has no NaN)."""
    n = len(values)
    if n == 0:
        return {"count": 0, "mean": None, "se": None}
    mean = sum(values) / n
    if n == 1:
        return {"count": 1, "mean": mean, "se": None}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"count": n, "mean": mean, "se": math.sqrt(var / n)}


def entropy_stats(token_texts: list, entropies: list) -> dict:
    """Per-answer token strings and entropies -> mean entropy of each word group against the rest.

    groups: "pivotal" (all four kinds together), each kind, "reflective", "other" (every token on
    no list) and "all"; each {count, mean, se}. words: the same for each listed word that occurred.
    """
    if len(token_texts) != len(entropies):
        raise ValueError(f"{len(token_texts)} token lists but {len(entropies)} entropy lists: one of each per answer")
    by_group = {g: [] for g in ["pivotal", *PIVOTAL, "reflective", "other", "all"]}
    by_word = {}
    for tokens, hs in zip(token_texts, entropies):
        if len(tokens) != len(hs):
            raise ValueError(f"an answer has {len(tokens)} tokens but {len(hs)} entropies")
        for h, mark in zip(hs, match_words(tokens)):
            group, word = mark or ("other", None)
            by_group["all"].append(float(h))
            by_group[group].append(float(h))
            if group in PIVOTAL:
                by_group["pivotal"].append(float(h))
            if word:
                by_word.setdefault(word, (group, []))[1].append(float(h))
    words = {w: {"group": g, **_summary(hs)} for w, (g, hs) in sorted(by_word.items(), key=lambda kv: -len(kv[1][1]))}
    return {"answers": len(token_texts), "groups": {g: _summary(v) for g, v in by_group.items()}, "words": words}


def format_stats(stats: dict) -> str:
    """The groups as a table, then the listed words seen, most frequent first."""
    def num(x, width, digits=3):
        return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}}"

    other = stats["groups"]["other"]["mean"]
    lines = [f"{'group':<20}{'tokens':>8}{'mean H':>9}{'s.e.':>8}{'x other':>9}"]
    for g, s in stats["groups"].items():
        name = f"  {g}" if g in PIVOTAL else g
        ratio = s["mean"] / other if s["mean"] is not None and other else None
        lines.append(f"{name:<20}{s['count']:>8}{num(s['mean'], 9)}{num(s['se'], 8)}{num(ratio, 9, 2)}")
    lines.append(f"(mean H in nats over {stats['answers']} answers; s.e. = sample std / sqrt(tokens); "
                 "x other = mean H / mean H of other tokens)")
    seen = [f"{w} {s['count']}x {s['mean']:.2f}" for w, s in stats["words"].items()]
    lines.append("words seen (count x mean H): " + (", ".join(seen) if seen else "none"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The views: one colour scale, rendered for the terminal and for a browser


def colour(h: float) -> tuple:
    """Entropy (nats) -> (r, g, b), linear between STOPS on 0..H_MAX, clipped at both ends."""
    x = min(max(h / H_MAX, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(STOPS, STOPS[1:]):
        if x <= x1:
            f = (x - x0) / (x1 - x0)
            return tuple(round(a + f * (b - a)) for a, b in zip(c0, c1))


def _hex(h: float) -> str:
    return "#%02x%02x%02x" % colour(h)


def visible(token: str) -> str:
    """A token as shown: a newline gets a mark so its colour shows, and control characters (a
    model's "\\x1b" would drive the terminal) are written out as escapes."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵\n")
        elif ch != "\t" and (ord(ch) < 32 or ord(ch) == 127):
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


_CUBE = (0, 95, 135, 175, 215, 255)  # the levels of xterm's 6x6x6 colour cube (codes 16..231)


def _ansi_bg(rgb) -> str:
    """Background of the nearest 256-colour cube entry, with black text so every shade stays readable."""
    r, g, b = (min(range(6), key=lambda i: abs(_CUBE[i] - c)) for c in rgb)
    return f"\x1b[48;5;{16 + 36 * r + 6 * g + b}m\x1b[38;5;16m"


def render_ansi(tokens: list, entropies: list) -> str:
    """The tokens with 256-colour backgrounds. Each line is reset before its newline, so a colour
    never bleeds to the end of the terminal line."""
    out = []
    for tok, h in zip(tokens, entropies):
        bg = _ansi_bg(colour(float(h)))
        out.append("\n".join(f"{bg}{piece}\x1b[0m" if piece else "" for piece in visible(tok).split("\n")))
    return "".join(out)


def use_colour(choice: str, stream=None, environ=None) -> bool:
    """--color auto | always | never. auto colours only a terminal, and not when NO_COLOR is set
    (no-color.org): output redirected to a file or a pipe is plain text, with no escape codes."""
    stream, environ = stream or sys.stdout, os.environ if environ is None else environ
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not environ.get("NO_COLOR")


def ansi_legend() -> str:
    steps = [i * H_MAX / 6 for i in range(7)]
    cells = "".join(f"{_ansi_bg(colour(h))} {h:.1f}{'+' if h == H_MAX else ''} \x1b[0m" for h in steps)
    return f"entropy (nats): {cells}  clipped at {H_MAX:g}; ↵ marks a newline token"


def render_html(items: list, stats: dict | None = None, title: str = "Token entropy") -> str:
    """A self-contained page: a legend, then each answer's question, grade and coloured tokens
    (hover one for its entropy), then the statistics table when given. All text is escaped."""
    esc = html.escape  # quote=True by default: safe inside title="..." as well
    legend = "".join(f'<span class="tok" style="background:{_hex(h)}">{h:.1f}'
                     f'{"+" if h == H_MAX else ""}</span>' for h in [i * H_MAX / 6 for i in range(7)])
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             ".answer{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}"
             ".text{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
             ".tok{border-radius:2px}.listed{border-bottom:2px solid #333}"
             ".ok{color:#1a7f37}.bad{color:#c62828}.meta{color:#555;font-size:.9em}"
             "table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}</style>",
             "</head>", "<body>", f"<h1>{esc(title)}</h1>",
             f'<div class="legend">Entropy in nats, from 0 (white) to {H_MAX:g} (red; larger values are clipped): '
             f'{legend}. Underlined tokens are on the pivotal or reflective word lists; ↵ marks a newline.</div>']
    for a in items:
        grade = '<span class="ok">correct</span>' if a.correct else '<span class="bad">wrong</span>'
        mean = sum(map(float, a.entropies)) / max(len(a.entropies), 1)
        spans = []
        for tok, h, mark in zip(a.tokens, a.entropies, match_words(a.tokens)):
            tip = f"{float(h):.3f} nats" + (f" · {mark[1]}: {mark[0]}" if mark else "")
            cls = "tok listed" if mark else "tok"
            spans.append(f'<span class="{cls}" style="background:{_hex(float(h))}" '
                         f'title="{esc(tip)}">{esc(visible(tok))}</span>')
        parts += ['<div class="answer">', f"<div><b>Question:</b> {esc(a.question)}</div>",
                  f'<div class="meta">{grade} (gold answer {esc(str(a.gold))}) · {len(a.tokens)} tokens · '
                  f"mean entropy {mean:.3f} nats</div>", f'<div class="text">{"".join(spans)}</div>', "</div>"]
    if stats:
        parts += ["<h2>Entropy by word group</h2>", "<table>",
                  "<tr><th>group</th><th>tokens</th><th>mean H (nats)</th><th>s.e.</th></tr>"]
        for g, s in stats["groups"].items():
            cells = [f"{s[k]:.3f}" if s[k] is not None else "-" for k in ("mean", "se")]
            parts.append(f"<tr><td>{esc(g)}</td><td>{s['count']}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
        parts.append("</table>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------------------------
# Sampling and the command line


def decode_tokens(tokenizer, ids: list) -> list:
    """The text of each token. Byte-level vocabularies (SmolLM2, Qwen) can spread one character
    ("×", "÷") over several tokens, and each piece alone decodes to U+FFFD; so a piece that does
    not decode cleanly is decoded together with the next ones (a UTF-8 character is at most 4
    bytes), the character goes to the first piece and the others show as empty."""
    texts, i = [], 0
    while i < len(ids):
        j, text = i + 1, tokenizer.decode(ids[i : i + 1])
        while "\ufffd" in text and j < len(ids) and j - i < 4:
            j, text = j + 1, tokenizer.decode(ids[i : j + 1])
        if "\ufffd" in text:  # not a split character after all (or a real U+FFFD): this token alone
            j, text = i + 1, tokenizer.decode(ids[i : i + 1])
        texts += [text] + [""] * (j - i - 1)
        i = j
    return texts


def sample_answers(model, tokenizer, problems, settings) -> list:
    """settings.n answers per problem (settings: an evaluate.EvalSettings), each with its per-token
    strings and entropies, and graded. We choose the batch size: ROWS_PER_CALL rows per sampling call."""
    from evaluate import sample_problems
    from grader import grade_response

    n = settings.n
    settings = replace(settings, batch_prompts=max(1, ROWS_PER_CALL // n))  # prompts per call
    answers = []
    for batch, r in sample_problems(model, tokenizer, problems, settings):
        for j in range(r.response_ids.shape[0]):
            keep = r.response_mask[j].bool()  # the answer's tokens, up to and including its stop token
            ids = r.response_ids[j][keep].tolist()
            p = batch[j // n]
            # graded as evaluate.py grades: an answer cut off by the budget is wrong
            right = grade_response(r.texts[j], p.answer, bool(r.stopped[j]), settings.grader)
            answers.append(Answer(p.question, p.answer, right, decode_tokens(tokenizer, ids),
                                  r.entropies[j][keep].tolist()))
    return answers


def main(argv=None):
    from evaluate import EvalSettings, check_device, cuda_graph_option
    from plumbing.command_line import OneLineParser, check_context, check_sampling, make_out_folder
    from tasks import load_problems

    p = OneLineParser(description="Colour sampled tokens by entropy; compare pivotal and reflective words.")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub id, a model folder or a .gguf file")
    p.add_argument("--task", default="arith", help="arith[:LEVEL], gsm8k, math500, aime24, amc23, or a .jsonl file")
    p.add_argument("--question-field", default=None, help="field holding the question in a local file")
    p.add_argument("--answer-field", default=None, help="field holding the gold answer in a local file")
    p.add_argument("--limit", type=int, default=4, help="the first L test problems")
    p.add_argument("--n", type=int, default=2, help="answers per problem")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response budget in tokens")
    p.add_argument("--temperature", type=float, default=0.6, help="the paper evaluates at 0.6")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; the paper uses 0.95")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--cuda-graph", default="auto", help="auto | true | false: replay decode steps as CUDA graphs (auto: on CUDA)")
    p.add_argument("--out", default="runs/entropy", help="folder for entropy.html and entropy_stats.json")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="colour the tokens: auto = only on a terminal, and not if NO_COLOR is set")
    args = p.parse_args(argv)
    try:
        # every check that needs no model first: a typo costs a second, a bad --out no sampling
        check_sampling(args.n, args.max_new_tokens, args.temperature, args.top_p)
        if args.limit < 1:
            raise ValueError(f"--limit must be a positive number of problems, got {args.limit}")
        check_device(args.device)
        cuda_graph = cuda_graph_option(args.cuda_graph, args.device)
        make_out_folder(args.out)
        from plumbing.load import load_model

        problems = load_problems(args.task, "test", args.limit, args.seed, args.question_field, args.answer_field)
        model, tokenizer = load_model(args.model, device=args.device)
        check_context(model, tokenizer, problems, args.max_new_tokens)
        settings = EvalSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, cuda_graph=cuda_graph)
        answers = sample_answers(model, tokenizer, problems, settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    colour = use_colour(args.color)
    plain = "plain text (no terminal, or NO_COLOR set; --color always colours): see entropy.html"
    print(ansi_legend() if colour else plain)
    for a in answers:
        print(f"\n--- {a.question}  [{'correct' if a.correct else 'wrong'}, gold {a.gold}]")
        print(render_ansi(a.tokens, a.entropies) if colour else "".join(map(visible, a.tokens)))
    stats = entropy_stats([a.tokens for a in answers], [a.entropies for a in answers])
    print("\n" + (ansi_legend() + "\n\n" if colour else "") + format_stats(stats))

    settings = {k: v for k, v in vars(args).items() if k not in ("device", "out")}
    title = f"Token entropy: {args.model} on {args.task}, temperature {args.temperature}, top-p {args.top_p}"
    with open(os.path.join(args.out, "entropy.html"), "w", encoding="utf-8") as f:
        f.write(render_html(answers, stats, title))
    with open(os.path.join(args.out, "entropy_stats.json"), "w") as f:
        lists = {"pivotal": PIVOTAL, "reflective": REFLECTIVE}  # what was matched, for whoever reads the file later
        json.dump({"settings": settings, "word_lists": lists, **stats}, f, indent=1)
    print(f"wrote entropy.html and entropy_stats.json to {args.out}")


if __name__ == "__main__":
    main()
