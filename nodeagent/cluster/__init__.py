"""The cluster as the node sees it: the object model, decoding the API's objects into it, the events sources emit,
and the sources themselves (`discovery`). Pure except `discovery`.
"""
