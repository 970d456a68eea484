/* One pass of AdamW over a contiguous range: bf16 grads in, fp32 master and moments updated in
 * place, the master's bf16 copy written out. Plain C99: knows nothing of Python, torch, chunks
 * or threads (the caller splits the work; this runs on one thread).
 *
 * The maths is torch's CPU fused AdamW (adamw mode, no amsgrad, no maximize) for fp32 state, in
 * its order of operations and with its double -> float scalar casts, so that each element can
 * get the bits `torch._fused_adamw_` gives it on the grad widened to fp32 and scaled by `coef`:
 *
 *   g  = float(bf16 grad) * coef                     (coef 1: g exactly)
 *   p  = p * float(1 - lr * wd)                      (decoupled decay; wd 0: p exactly)
 *   m  = lerp(m, g, w),  w = float(1 - beta1)        (|w| < 0.5: m + w (g - m),
 *                                                     else g + (w - 1) (g - m))
 *   v  = v * float(beta2) + float(1 - beta2) * g * g
 *   p  = p + float(-lr / bc1) * m / (sqrt(v) / float(sqrt(bc2)) + float(eps))
 *
 * Which of those multiplies and adds torch's build fuses into one fma differs between its SIMD
 * body and its scalar tail (the last n mod vector-width elements of each tensor), and with the
 * compiler that built it. `body_form` and `tail_form` say which (FUSE_* bits, found by the
 * caller against torch on this machine); elements from `tail` on get `tail_form`. This file is
 * built with -ffp-contract=off so that the compiler fuses nothing of its own: the only fused
 * operations are the fmaf calls below.
 *
 * Written for the auto-vectorizer: restrict pointers, no per-element branches (selects only).
 * GCC vectorizes a loop only where the form is a constant, so the body runs in one loop per form
 * and param-or-not (the switch below, ~75 KB of code in all); the tail, fewer elements than one
 * vector, runs in a scalar loop that takes any form. Bound by memory (30 bytes an element moved):
 * one thread of the 2-core dev box does 1.0 G elements/s whichever the form.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define HOMESTAR_EXPORT __attribute__((visibility("default")))

enum {
    FUSE_LERP = 1,          /* m = fma(coeff, g - m, base), else base + coeff * (g - m)    */
    FUSE_SQ_PRODUCT = 2,    /* v = fma(c2 * g, g, v * beta2)                                */
    FUSE_SQ_DECAY = 4,      /* v = fma(v, beta2, c2 * g * g)  (neither: v * beta2 + c2 g g) */
    FUSE_PARAM = 8          /* p = fma(p, decay, delta), else p * decay + delta             */
};

/* Without a hardware fma the call would go to libm, one element at a time; torch's vectors on
 * such a machine do not fuse either, so the fused forms are never the ones that match there. */
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
#define FMA(a, b, c) fmaf((a), (b), (c))
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; /* a bf16 is an fp32's top half: widening is exact */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    /* round to nearest, ties to even, as torch's cast; a NaN keeps its sign and top payload bits
     * with the quiet bit set (rounding it could carry it into an infinity) */
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t nan = (bits >> 16) | 0x0040u;
    return (uint16_t)(f != f ? nan : rounded);
}

typedef struct {
    float coef, decay, coeff, beta2, sq_w, bc2_sqrt, eps, neg_step;
    int small_w;
} scalars;

/* One element. Inlined into loops where `with_param` is a constant and `form` is invariant. */
static inline void update(const uint16_t *restrict grad, float *restrict master, float *restrict exp_avg,
                          float *restrict exp_avg_sq, uint16_t *restrict param, int64_t i,
                          const scalars *s, int form, int with_param) {
    float g = bf16_to_float(grad[i]) * s->coef;
    float p = master[i];
    float m = exp_avg[i];
    float v = exp_avg_sq[i];

    /* torch's two lerp branches as one: base + coeff (g - m), with (coeff, base) = (w, m) or
     * (w - 1, g); w - 1 and 1 - w are exact where the second is taken, so this is also its
     * scalar loop's g - (g - m) (1 - w) */
    float base = s->small_w ? m : g;
    float diff = g - m;
    float m_split = base + s->coeff * diff;
    float m_fused = FMA(s->coeff, diff, base);
    m = (form & FUSE_LERP) ? m_fused : m_split;

    float cg = s->sq_w * g;
    float vb = v * s->beta2;
    float v_split = vb + cg * g;
    float v_product = FMA(cg, g, vb);
    float v_decay = FMA(v, s->beta2, cg * g);
    v = (form & FUSE_SQ_PRODUCT) ? v_product : (form & FUSE_SQ_DECAY) ? v_decay : v_split;

    float denom = sqrtf(v) / s->bc2_sqrt + s->eps;
    float delta = s->neg_step * m / denom;
    float p_split = p * s->decay + delta;
    float p_fused = FMA(p, s->decay, delta);
    p = (form & FUSE_PARAM) ? p_fused : p_split;

    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    master[i] = p;
    if (with_param)
        param[i] = float_to_bf16(p);
}

#define BODY(form)                                                                                \
    case form:                                                                                    \
        if (param != NULL)                                                                        \
            LOOP(0, tail, form, 1);                                                               \
        else                                                                                      \
            LOOP(0, tail, form, 0);                                                               \
        break;

#define LOOP(from, to, form, with_param)                                                          \
    for (int64_t i = (from); i < (to); ++i)                                                       \
    update(grad, master, exp_avg, exp_avg_sq, param, i, &s, (form), (with_param))

/* AdamW over elements [0, n) of these buffers; `param` may be NULL (the master is the param).
 * `coef`: the grad clip's scale (1: none). The scalars are torch's, in double: the bias
 * corrections 1 - beta1^step and sqrt(1 - beta2^step) of this parameter's step count. */
HOMESTAR_EXPORT void homestar_adamw_bf16(const uint16_t *restrict grad, float *restrict master,
                                         float *restrict exp_avg, float *restrict exp_avg_sq,
                                         uint16_t *restrict param, int64_t n, int64_t tail,
                                         int body_form, int tail_form, float coef, double lr, double beta1,
                                         double beta2, double eps, double weight_decay,
                                         double bias_correction1, double bias_correction2_sqrt) {
    scalars s;
    float w = (float)(1.0 - beta1); /* every scalar as torch forms it: in double, then cast */
    s.coef = coef;
    s.decay = (float)(1.0 - lr * weight_decay);
    s.small_w = fabsf(w) < 0.5f;
    s.coeff = s.small_w ? w : w - 1.0f;
    s.beta2 = (float)beta2;
    s.sq_w = (float)(1.0 - beta2);
    s.bc2_sqrt = (float)bias_correction2_sqrt;
    s.eps = (float)eps;
    s.neg_step = (float)(-(lr / bias_correction1));
    if (tail < 0)
        tail = 0;
    if (tail > n)
        tail = n;
    /* the body, most of the work, in loops specialized to each form, so each is straight-line
     * and vectorized; the tail (fewer elements than a vector) in one loop taking any form */
    switch (body_form) {
        BODY(0) BODY(1) BODY(2) BODY(3) BODY(4) BODY(5)
        BODY(8) BODY(9) BODY(10) BODY(11) BODY(12) BODY(13)
    default: /* any other bits: the same loop as the tail's, correct but not vectorized */
        if (param != NULL)
            LOOP(0, tail, body_form, 1);
        else
            LOOP(0, tail, body_form, 0);
    }
    if (param != NULL)
        LOOP(tail, n, tail_form, 1);
    else
        LOOP(tail, n, tail_form, 0);
}
