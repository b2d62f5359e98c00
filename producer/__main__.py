"""`python -m producer` is the `shuttle` command."""

from producer.cli import main

main()
