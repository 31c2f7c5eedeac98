"""Pure metric functions, task builders, comparative prompting, geometry and the one runner that turns a config into result rows. Imports the stages below training."""
