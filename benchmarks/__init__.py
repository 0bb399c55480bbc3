"""`make bench`: quality and speed suites, measured in the run that prints them."""
