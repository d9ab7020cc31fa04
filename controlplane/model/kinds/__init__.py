"""The five kinds of policy document, one module each: its keys, their converters and the element built."""
