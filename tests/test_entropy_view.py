"""entropy_view.py: the statistics match hand-computed values, the pages are escaped and well formed,
and the command runs end to end on a tiny model."""

import json
import statistics
from html.parser import HTMLParser

import pytest

import entropy_view as ev
from entropy_view import Answer, entropy_stats, match_words, render_ansi, render_html

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

# -----------------------------------------------------------------------------------------------
# Matching words to tokens: one line per case


@pytest.mark.parametrize("tokens, expected", [
    (["Hence"], [("causal", "hence")]),
    ([" BUT", ","], [("contrastive", "but"), None]),  # any case, punctuation around it
    (["(", "then", ")"], [None, ("sequential", "then"), None]),
    ([" there", "fore"], [("causal", "therefore"), None]),  # a split word counts its first piece
    ([" some", "how"], [None, None]),  # "so" is only a prefix of "somehow"
    ([" sol", "ve"], [None, None]),  # a first piece that spells a prefix is not the word
    ([" sometimes"], [None]),
    ([" check", "ed"], [None, None]),  # inflections are words of their own
    ([" first", "ly"], [None, None]),
    ([" double", "-", "check"], [("reflective", "double-check"), None, None]),  # hyphenated words are one word
    (["Let", "'s", " re", "check"], [None, None, ("reflective", "recheck"), None]),
    ([" Wait", "..."], [("reflective", "wait"), None]),
    (["so", "\n", "but"], [("causal", "so"), None, ("contrastive", "but")]),
    ([" x", "=", "2"], [None, None, None]),
])
def test_match_words(tokens, expected):
    assert match_words(tokens) == expected


def test_every_word_is_lower_case_and_in_one_group():
    words = [w for ws in ev.PIVOTAL.values() for w in ws] + ev.REFLECTIVE
    assert all(w == w.lower() for w in words)
    assert len(words) == len(set(words)) == len(ev.WORD_GROUP)


# -----------------------------------------------------------------------------------------------
# Statistics on a hand-built batch


BATCH_TOKENS = [
    ["So", ",", " there", "fore", " x", " =", " 2", "."],
    [" Wait", "!", " some", "how", " sol", "ve", " BUT", " check", "ed", " double", "-", "check"],
]
BATCH_ENTROPIES = [
    [1.0, 0.1, 2.0, 0.0, 0.5, 0.3, 0.2, 0.4],
    [3.0, 0.2, 0.6, 0.0, 0.8, 0.0, 1.4, 0.9, 0.1, 0.7, 0.0, 0.1],
]


def test_stats_on_a_hand_built_batch():
    s = entropy_stats(BATCH_TOKENS, BATCH_ENTROPIES)
    g = s["groups"]
    # by hand: causal = So 1.0, there(fore) 2.0; contrastive = BUT 1.4; reflective = Wait 3.0, double(-check) 0.7
    assert g["causal"]["count"] == 2 and g["causal"]["mean"] == pytest.approx(1.5)
    assert g["causal"]["se"] == pytest.approx(0.5)  # std of {1, 2} is 1/sqrt(2); / sqrt(2) = 0.5
    assert g["contrastive"] == {"count": 1, "mean": pytest.approx(1.4), "se": None}  # one value: no spread
    assert g["sequential"] == {"count": 0, "mean": None, "se": None}
    assert g["pivotal"]["count"] == 3 and g["pivotal"]["mean"] == pytest.approx(4.4 / 3)
    assert g["pivotal"]["se"] == pytest.approx(statistics.stdev([1.0, 2.0, 1.4]) / 3 ** 0.5)
    assert g["reflective"]["count"] == 2 and g["reflective"]["mean"] == pytest.approx(1.85)
    assert g["reflective"]["se"] == pytest.approx(1.15)  # |3.0 - 0.7| / 2
    other = [0.1, 0.0, 0.5, 0.3, 0.2, 0.4, 0.2, 0.6, 0.0, 0.8, 0.0, 0.9, 0.1, 0.0, 0.1]  # the 15 unlisted tokens
    assert g["other"]["count"] == 15 and g["other"]["mean"] == pytest.approx(sum(other) / 15)
    assert g["other"]["se"] == pytest.approx(statistics.stdev(other) / 15 ** 0.5)
    assert g["all"]["count"] == 20 and g["all"]["mean"] == pytest.approx(sum(map(sum, BATCH_ENTROPIES)) / 20)
    assert s["answers"] == 2
    assert set(s["words"]) == {"so", "therefore", "but", "wait", "double-check"}  # no "check" from "checked"
    assert s["words"]["therefore"] == {"group": "causal", "count": 1, "mean": pytest.approx(2.0), "se": None}


def test_stats_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="tokens but"):
        entropy_stats([["a", "b"]], [[0.1]])
    with pytest.raises(ValueError, match="one of each per answer"):
        entropy_stats([["a"]], [])


def test_table_lists_every_group():
    table = ev.format_stats(entropy_stats(BATCH_TOKENS, BATCH_ENTROPIES))
    for name in ("pivotal", "causal", "reasoning verbs", "reflective", "other", "all", "therefore 1x 2.00"):
        assert name in table
    assert json.loads(json.dumps(entropy_stats(BATCH_TOKENS, BATCH_ENTROPIES)))  # JSON-safe: None, never NaN


# -----------------------------------------------------------------------------------------------
# The views


def test_colour_scale_is_clipped_to_its_range():
    assert ev.colour(0.0) == ev.colour(-1.0) == (255, 255, 255)
    assert ev.colour(ev.H_MAX) == ev.colour(10 * ev.H_MAX) == ev.STOPS[-1][1]
    greens = [ev.colour(h)[1] for h in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)]
    assert greens == sorted(greens, reverse=True) and len(set(greens)) == len(greens)  # darker as H rises


class TagChecker(HTMLParser):
    """Records every problem with nesting: an end tag that does not close the innermost open tag."""

    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.seen, self.titles, self.decl = [], [], [], [], None

    def handle_decl(self, decl):
        self.decl = decl

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        self.titles += [v for k, v in attrs if k == "title"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def check_page(page: str) -> TagChecker:
    assert page.startswith("<!DOCTYPE html>")
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []  # every opened span/div/table closed, in order
    assert [checker.seen.count(t) for t in ("html", "head", "body")] == [1, 1, 1]
    return checker


def test_html_escapes_the_response_and_is_a_valid_page():
    evil = "<script>alert(1)</script>"
    items = [Answer('What is 1 < 2 & "3"?', "<b>7</b>", False, ["So", " the", evil, "\n", " answer"],
                    [1.2, 0.1, 2.9, 0.4, 0.05]),
             Answer("What is 2 + 2?", "4", True, [" 4"], [0.0])]
    page = render_html(items, entropy_stats([a.tokens for a in items], [a.entropies for a in items]))
    checker = check_page(page)
    assert "<script" not in page  # the page has no script of its own, so any would be the response's
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "What is 1 &lt; 2 &amp; &quot;3&quot;?" in page and "&lt;b&gt;7&lt;/b&gt;" in page
    token_titles = [t for t in checker.titles if t.endswith("nats") or "nats ·" in t]
    assert len(token_titles) == 6  # one tooltip per token
    assert "1.200 nats · so: causal" in token_titles and "2.900 nats" in token_titles
    assert "correct" in page and "wrong" in page and "nats" in page and "<table>" in page
    assert "background:#ffffff" in page and "background:#d7191c" in page  # the scale's two ends


def test_ansi_colours_each_token_and_neutralises_terminal_escapes():
    out = render_ansi(["a", "\n", "b", "\x1b[2J"], [0.0, 3.0, 5.0, 1.0])
    assert out.count("\x1b[48;5;") == 4  # one background per token (the newline's on its mark)
    assert "\\x1b[2J" in out and "\x1b[2J" not in out  # the model's escape is shown, not obeyed
    assert all(line.endswith("\x1b[0m") for line in out.split("\n"))  # no colour runs past a line's end
    assert ev._ansi_bg(ev.colour(0.0)).startswith("\x1b[48;5;231m")  # white in the 256-colour cube
    assert ev._ansi_bg(ev.colour(3.0)) == ev._ansi_bg(ev.colour(30.0))  # clipped
    legend = ev.ansi_legend()
    assert "nats" in legend and legend.count("\x1b[48;5;") == 7 and f"clipped at {ev.H_MAX:g}" in legend


# -----------------------------------------------------------------------------------------------
# The command line




def test_command_line_end_to_end(tmp_path, tiny_folder, capsys):
    from plumbing.load import load_model
    from tasks import load_problems
    from rollout import format_prompt, sample

    out = tmp_path / "view"
    ev.main(["--model", tiny_folder, "--task", "arith:1", "--limit", "3", "--n", "2", "--max-new-tokens", "8",
             "--device", "cpu", "--seed", "5", "--out", str(out)])
    printed = capsys.readouterr().out  # captured, as in a pipe or a file: not a terminal
    assert "\x1b[" not in printed and "plain text" in printed and "reflective" in printed
    stats = json.loads((out / "entropy_stats.json").read_text())
    assert stats["settings"]["n"] == 2 and stats["answers"] == 6 and "wait" in stats["word_lists"]["reflective"]
    g = stats["groups"]
    assert g["all"]["count"] == g["pivotal"]["count"] + g["reflective"]["count"] + g["other"]["count"]
    page = (out / "entropy.html").read_text()
    check_page(page)
    assert page.count('class="answer"') == 6

    # the same sampling call by hand (same seed) gives the same tokens: the stats are of what was sampled
    model, tok = load_model(tiny_folder, device="cpu")
    problems = load_problems("arith:1", "test", 3, 5)
    r = sample(model, tok, [format_prompt(tok, p.question) for p in problems], group_size=2, max_new_tokens=8,
               temperature=0.6, top_p=0.95, seed=5)
    assert g["all"]["count"] == int(r.response_mask.sum())
    assert g["all"]["mean"] == pytest.approx((r.entropies.sum() / r.response_mask.sum()).item(), rel=1e-5)


class Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("choice,tty,environ,expected", [
    ("auto", True, {}, True),
    ("auto", False, {}, False),  # a pipe or a file: plain text
    ("auto", True, {"NO_COLOR": "1"}, False),  # no-color.org
    ("auto", True, {"NO_COLOR": ""}, True),  # set but empty: ignored, as the convention says
    ("always", False, {"NO_COLOR": "1"}, True),  # an explicit flag wins
    ("never", True, {}, False),
])
def test_colour_only_on_a_terminal_and_never_with_no_color(choice, tty, environ, expected):
    assert ev.use_colour(choice, Stream(tty), environ) is expected


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n and --max-new-tokens must be positive"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--task", "nonsense"], "unknown task 'nonsense'"),
])
def test_bad_arguments_give_one_clear_message_before_loading_a_model(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "no/such-model-anywhere", *argv])  # a model load would fail differently
    assert e.value.code == 2
    assert message in capsys.readouterr().err


class ByteTokenizer:
    """Token i is byte i: the worst case of a byte-level vocabulary, every non-ASCII character split."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text, expected", [
    ("a b", ["a", " ", "b"]),
    ("7 × 3", ["7", " ", "×", "", " ", "3"]),  # × is 2 bytes: the character goes to its first piece
    ("€!", ["€", "", "", "!"]),  # 3 bytes
])
def test_decode_tokens_keeps_split_characters_whole(text, expected):
    assert ev.decode_tokens(ByteTokenizer(), list(text.encode())) == expected
    assert ev.decode_tokens(ByteTokenizer(), [0xFF, 0x41]) == ["\ufffd", "A"]  # a stray byte stays alone
