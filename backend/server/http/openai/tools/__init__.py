"""Tool calling for the chat door: the offered tools and the choice among them (``plan``), the
model's own tool-call format (``parsers``), tools rendered for templates that do not render
them (``prompt``), and streamed tool calls (``stream``)."""
