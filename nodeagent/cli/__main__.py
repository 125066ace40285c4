"""`python -m nodeagent.cli`: the same command line as `nodeagent` (the lab's tests start it so)."""

from nodeagent.cli import main

main()
