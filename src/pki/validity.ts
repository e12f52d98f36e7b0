/** Validity periods: whole seconds, backdating, and clamping to the issuer's lifetime. */
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";

/** How far notBefore is set before `now`, so that a peer whose clock is a little behind accepts a new certificate. */
export const BACKDATE_SECONDS = 60;

/** Longest validity kmi writes into any certificate (30 years, for roots). */
export const MAX_VALIDITY_SECONDS = 30 * 365 * 24 * 3600;

/** A validity period. */
export interface Validity {
  /** Start, whole seconds. */
  readonly notBefore: Date;
  /** End, whole seconds. */
  readonly notAfter: Date;
}

/** `date` truncated to whole seconds (certificates carry no fractions). */
export function wholeSeconds(date: Date): Date {
  return new Date(Math.floor(date.getTime() / 1000) * 1000);
}

/** Checks that `date` is a valid Date; InvalidArgument naming `field` otherwise. */
export function checkDate(date: Date, field: string): void {
  if (!(date instanceof Date) || !Number.isFinite(date.getTime())) {
    throw new InvalidArgument(`${field}: not a valid date; pass a Date`);
  }
}

/**
 * The validity of a certificate issued at `now` for `validitySeconds`: notBefore backdated by
 * {@link BACKDATE_SECONDS}, notAfter clamped to the issuer's notAfter (a certificate never outlives
 * its issuer). FailedPrecondition when the issuer has expired by `now`.
 */
export function validityFor(now: Date, validitySeconds: number, issuerNotAfter?: Date): Validity {
  checkDate(now, "now");
  if (!Number.isInteger(validitySeconds) || validitySeconds < 1 || validitySeconds > MAX_VALIDITY_SECONDS) {
    throw new InvalidArgument(`validity_seconds: must be a whole number of seconds from 1 to ${MAX_VALIDITY_SECONDS}`);
  }
  const notBefore = wholeSeconds(new Date(now.getTime() - BACKDATE_SECONDS * 1000));
  let notAfter = wholeSeconds(new Date(now.getTime() + validitySeconds * 1000));
  if (issuerNotAfter && notAfter.getTime() > issuerNotAfter.getTime()) notAfter = wholeSeconds(issuerNotAfter);
  if (issuerNotAfter && issuerNotAfter.getTime() <= now.getTime()) {
    throw new FailedPrecondition(`issuer: expired at ${issuerNotAfter.toISOString()}; renew or rotate the CA first`);
  }
  return { notBefore, notAfter };
}
