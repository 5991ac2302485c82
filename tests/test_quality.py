from unmask.eval.quality import (body_parses, function_body, function_prompts, has_degenerate_repetition)

SOURCE = '''
def add(a, b):
    """Add two numbers."""
    return a + b


class K:
    def method(self, x):
        """Double x."""
        y = x * 2
        return y


def nodoc(x):
    return x
'''


def test_function_prompts_take_signature_and_docstring():
    prompts = function_prompts([SOURCE], limit=10)
    heads = sorted(p.prompt for p in prompts)
    assert heads == ['def add(a, b):\n    """Add two numbers."""\n', 'def method(self, x):\n    """Double x."""\n']
    method = next(p for p in prompts if "method" in p.prompt)
    assert method.body == "    y = x * 2\n    return y\n"


def test_repetition_detector():
    assert has_degenerate_repetition([1, 2, 3, 4] * 4)
    assert not has_degenerate_repetition([1, 2, 3, 4] * 3)
    assert not has_degenerate_repetition(list(range(40)))


def test_parse_rate_cuts_at_function_end_and_rejects_empty_bodies():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert body_parses(prompt, "    return x\nprint(f(\n")  # the broken line is outside the function
    assert not body_parses(prompt, "    return (x\n")
    assert not body_parses(prompt, "\n# nothing\n")
    assert function_body("    a = 1\n\n    return a\nb = 2\n") == "    a = 1\n\n    return a\n"
    # out of tokens mid-line: judged on the finished lines only, which must still parse
    assert function_body("    a = 1\n    return (a +") == "    a = 1\n"
    assert body_parses(prompt, "    a = 1\n    return (a +")
    assert not body_parses(prompt, "    a = (1\n    return a")
    assert not body_parses(prompt, "    return (a +")  # nothing finished: an empty body
