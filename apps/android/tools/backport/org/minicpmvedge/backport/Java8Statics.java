package org.minicpmvedge.backport;

/**
 * The Java 8 static hashCode methods of the boxed primitives, which Kotlin's data classes call
 * (jvm-target 1.8) and which Android has only from API 24. The Gradle build's D8 backports them;
 * the offline APK build (apps/android/tools/build-apk.py) has only dx, so it points each call
 * {@code java/lang/<Box>.hashCode(<prim>)I} at the same name and descriptor in this class instead.
 * Same results as the JDK's definitions. Only in the offline APK, never in the Gradle build.
 */
public final class Java8Statics {
    private Java8Statics() {}

    public static int hashCode(int value) {
        return value;
    }

    public static int hashCode(long value) {
        return (int) (value ^ (value >>> 32));
    }

    public static int hashCode(float value) {
        return Float.floatToIntBits(value);
    }

    public static int hashCode(double value) {
        return hashCode(Double.doubleToLongBits(value));
    }

    public static int hashCode(boolean value) {
        return value ? 1231 : 1237;
    }

    public static int hashCode(short value) {
        return value;
    }

    public static int hashCode(byte value) {
        return value;
    }

    public static int hashCode(char value) {
        return value;
    }
}
