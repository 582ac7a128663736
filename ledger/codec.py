"""Bytes <-> ledger events (JSON). Anything undecodable or invalid raises `InvalidEvent`."""

from __future__ import annotations

import msgspec

from ledger.events import Event, InputEvent, InvalidEvent

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_input_decoder = msgspec.json.Decoder(InputEvent)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode any ledger event, derived ones included."""
    return _decode(_event_decoder, data)


def decode_input_event(data: bytes) -> InputEvent:
    """Decode an event the fold accepts as input (grant, void, usage)."""
    return _decode(_input_decoder, data)


def _decode(decoder: msgspec.json.Decoder, data: bytes):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidEvent(f"expected bytes, got {type(data).__name__}")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as error:
        raise InvalidEvent(f"invalid event: {error}") from None
    except msgspec.DecodeError as error:
        raise InvalidEvent(f"undecodable event: {error}") from None
