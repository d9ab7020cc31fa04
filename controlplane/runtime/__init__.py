"""The run time: the long-lived objects that turn sources into served snapshots (the policy service, the GitLab
link, the key relay, the event router), and how the process starts, stops and collects garbage."""
