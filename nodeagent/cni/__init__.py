"""The CNI plugin that enrolls pod sandboxes at creation (`plugin`, stdlib only: it runs on the node's Python) and
its installation into the node's CNI configuration (`conflist` pure, `install` the files)."""
