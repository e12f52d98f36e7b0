/**
 * The `authorization: Bearer <token>` header value a client sends, checked before it is set.
 * Why: a token with a character a header value cannot carry (a second line in the token file, a
 * stray control character) made `Headers.set` throw an error that quotes the whole header,
 * token included, and that error reached the terminal and `kmi up`'s logs. The token is a
 * secret: the message here says what is wrong and never shows it.
 */
import { InvalidArgument } from "./errors.js";

/** What a bearer token may hold: visible ASCII, no spaces (every kmi token is that). */
const TOKEN_CHARS = /^[\x21-\x7e]+$/;

/** `Bearer <token>`; throws InvalidArgument (without the token) when `token` cannot be sent. */
export function bearerAuthorization(token: string): string {
  if (token === "") throw new InvalidArgument("the bearer token is empty; put the token in the token file or variable");
  if (!TOKEN_CHARS.test(token)) {
    throw new InvalidArgument(
      "the bearer token holds a space, a line break or another character a token never has (the value is not shown: it is a secret); put only the token, on one line, in the token file or variable",
    );
  }
  return `Bearer ${token}`;
}
