"""CI runs exactly the README's test command (the developers' rule: what users are told to run is what CI runs)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().split("## The two commands", 1)[1].split("```bash", 1)[1]
    block = readme.split("```", 1)[0].replace("\\\n", " ")
    commands = [" ".join(line.split()) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and "train.py" in commands[0] and "pytest" in commands[1], commands
    ci = [" ".join(line.split()) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]], (ci, commands[1])
