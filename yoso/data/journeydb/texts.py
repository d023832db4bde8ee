"""Which text of a record is trained on (``--text_source``): its Midjourney prompt, its caption, or both.

A record is a JourneyDB annotation dict (``prompt``, ``Task2.Caption``, ``img_path`` ...) or a bare
string, which is a prompt.
"""

TEXT_SOURCES = ("prompt", "caption", "both")


def _caption(record):
    """``Task2.Caption`` when it is non-blank text, else None (JourneyDB lacks some captions)."""
    task2 = record.get("Task2")
    caption = task2.get("Caption") if type(task2) is dict else None
    return caption if type(caption) is str and caption.strip() else None


def record_texts(records, text_source, dropped, counters):
    """The texts to clean: a record's prompt, its caption, or both; a bare string is a prompt.

    ``dropped["missing_text"]`` counts records without the text; ``counters["caption_missing"]`` those
    whose caption is missing (their prompt is used instead).
    """
    if text_source == "prompt":  # the common case, kept lean: it runs once per record
        for record in records:
            text = record if type(record) is str else record.get("prompt")
            if type(text) is str:
                yield text
            else:
                dropped["missing_text"] += 1
        return
    for record in records:
        if type(record) is str:
            counters["caption_missing"] += 1
            yield record
            continue
        prompt = record.get("prompt")
        caption = _caption(record)
        has_prompt = type(prompt) is str
        if caption is not None:
            if text_source == "both" and has_prompt:
                yield prompt
            yield caption
            continue
        counters["caption_missing"] += 1
        if has_prompt:
            yield prompt  # "both": the prompt alone; "caption": captions are sometimes missing, fall back
        else:
            dropped["missing_text"] += 1


def record_texts_with_images(records, text_source, images, dropped, counters):
    """``(text, image file name)`` for each record whose image ``images`` finds; one text a record.

    The image is looked for first: a record without one is counted by ``images`` and never becomes a
    text, so a duplicate prompt whose image is present still gets in. ``text_source`` is "prompt" or
    "caption" ("both" would give one image two captions).
    """
    file_name_of = images.file_name_of
    for record in records:
        file_name = file_name_of(record)
        if file_name is None:
            continue
        prompt = record.get("prompt")  # file_name_of only finds images of dict records
        text = prompt
        if text_source == "caption":
            text = _caption(record)
            if text is None:
                counters["caption_missing"] += 1
                text = prompt
        if type(text) is str:
            yield text, file_name
        else:
            dropped["missing_text"] += 1
