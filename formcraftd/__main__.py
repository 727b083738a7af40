"""`python -m formcraftd` is the `formcraftd` command."""

from formcraftd.cli import main

raise SystemExit(main())
