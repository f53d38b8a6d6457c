"""Stop strings and streaming: text is cut at the first stop, and no piece of a stop leaks."""

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.text import TextAssembler, is_marker


def feed(pieces, stops):
    sent = []
    asm = TextAssembler(tuple(stops), sent.append)
    stopped = False
    for p in pieces:
        if asm.add(p):
            stopped = True
            break
    else:
        asm.flush()
    return asm.text, "".join(sent), stopped


def test_text_is_cut_before_a_stop_string_split_across_tokens():
    text, sent, stopped = feed(["Hello ", "wor", "ld", "END", "more"], ["END"])
    assert stopped and text == "Hello world" and sent == text


def test_a_partial_stop_is_held_back_then_released_when_it_is_not_a_stop():
    sent = []
    asm = TextAssembler(("STOP",), sent.append)
    asm.add("abc ST")
    assert "".join(sent) == "abc "  # "ST" might begin STOP
    asm.add("ART")
    assert "".join(sent) == "abc START"


def test_the_earliest_of_several_stops_wins():
    text, _, stopped = feed(["one\n\ntwo###"], ["###", "\n\n"])
    assert stopped and text == "one"


def test_without_stops_everything_streams():
    text, sent, stopped = feed(["a", "b", "c"], [])
    assert not stopped and text == sent == "abc"


def test_markers_for_image_or_audio_input_are_not_text_but_html_and_tool_tags_are():
    markers = [
        "<start_of_image>",
        "<end_of_image>",
        "[multimodal]",
        "<image_soft_token>",
        "<audio>",
    ]
    text = ["<table>", "</td>", "<img>", "<tool_call>", "<b>", "[1]", "<start_of_turn>", "\n\n"]
    assert [m for m in markers if not is_marker(m)] == []
    assert [t for t in text if is_marker(t)] == []


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab<>\n", max_size=12),
    stops=st.lists(st.text(alphabet="ab<>\n", min_size=1, max_size=6), max_size=3),
)
def test_what_is_held_back_is_the_longest_stop_prefix_the_text_ends_with(text, stops):
    """Held back: the longest proper prefix of a stop string that the text ends with (the
    assembler tries only prefixes ending in the text's last character; here every one)."""
    assembler = TextAssembler(tuple(stops), lambda _: None)
    assembler.text = text
    expected = max(
        (n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0
    )
    assert assembler._held_back() == expected
