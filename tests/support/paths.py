"""Where the tests find the repository and their sample files."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"  # real sample rows and PDFs (fixtures/README.md says from where)
