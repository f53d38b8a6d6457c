"""Stop strings and streaming: text is cut at the first stop, and no piece of a stop leaks."""

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
