"""`python -m exporter` is the same as `signalwire-exporter`."""

from exporter.cli import main

raise SystemExit(main())
